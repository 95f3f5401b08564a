"""Pipeline parallelism trains exactly like one process: stages hold contiguous depths of both
streams, each packed sequence is a microbatch (padded to the step's common shape), and the loss is
their mean, under 1F1B and interleaved 1F1B."""

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from lbva.models.attention import build_kernels
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.parallelism.mesh import ParallelConfig, ParallelDims
from lbva.parallelism.parallelize import step_layout_for
from lbva.parallelism.pipeline import build_pipeline, build_stages, pad_step_batch
from lbva.parallelism.step_layout import plain_layout
from lbva.training.optim import build_optimizer
from lbva.training.data.packing import build_packed_sequence, cut_windows
from lbva.training.step import FlowMatchingObjective, run_objective

from harness import (
    CPU,
    TrainCase,
    TrainRecord,
    build_case_model,
    gather_full_gradients,
    gather_full_parameters,
    parallel_run,
    reference_run,
)
from helpers import random_sample
from test_cp_parity import assert_small_gaps, parity_gaps


def pipeline_train_rank(case: TrainCase, parallel: ParallelConfig) -> TrainRecord:
    """Each step's sequences are split evenly over the dp ranks; a dp rank's share are the
    microbatches of one schedule step. The reported loss is the last stage's, sent to every rank."""
    dims = ParallelDims.resolve(
        parallel, dist.get_world_size(), model=get_preset(case.preset), token_budget=case.token_budget,
        pad_multiple=case.pad_multiple,
    )
    mesh = dims.build_mesh("cpu")
    model = build_case_model(case)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    pipeline = build_pipeline(model, mesh, parallel, step_layout_for(mesh, "sdpa"))
    parts = nn.ModuleList(pipeline.model_parts)
    optimizer = build_optimizer(parts, case.optim)
    microbatches = case.dp_size // dims.dp_size
    last_stage = mesh["pp"].mesh[-1].item()
    losses, gradients = [], {}
    for step, step_batches in enumerate(case.batches):
        mine = step_batches[mesh.dp_rank * microbatches : (mesh.dp_rank + 1) * microbatches]
        terms = run_objective(objective, pipeline, mine, pipeline.layout, CPU)
        if step == 0:
            gradients = {n: g for part in pipeline.model_parts for n, g in gather_full_gradients(part).items()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = torch.zeros(()) if terms is None else terms.total.detach().clone()
        dist.broadcast(reported, last_stage, group=mesh["pp"].get_group())
        dist.all_reduce(reported, group=mesh.dp.get_group())
        losses.append(reported.item() / dims.dp_size)
    parameters = {name: value for part in pipeline.model_parts for name, value in gather_full_parameters(part).items()}
    return TrainRecord(losses, gradients, parameters)


def test_stages_hold_every_parameter_once_under_the_full_models_name():
    model = LingBotVA(get_preset("demo-mot"))
    stages = [stage for rank in range(2) for _, stage in build_stages(model, rank, 2, 2, plain_layout("sdpa").kernels)]
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())


def _losses_and_gradients(model: LingBotVA, objective: FlowMatchingObjective, batch) -> tuple[float, list]:
    kernels = build_kernels(batch.layout, batch.layout.sample_id, batch.text_sample, "sdpa")
    video_pred, action_pred = model(batch.inputs, kernels)
    total = objective.losses(batch.targets, video_pred[0], action_pred[0]).total
    model.zero_grad()
    total.backward()
    return total.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_padding_a_microbatch_changes_neither_its_loss_nor_its_gradients(parity_case):
    case = parity_case("tiny-mot", steps=1)
    (seq, draws), = case.batches[0]
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    batch = objective.prepare(seq, draws, (1, 2, 2), CPU)
    model = build_case_model(case)
    loss, grads = _losses_and_gradients(model, objective, batch)
    padded = pad_step_batch(batch, batch.num_video + 32, batch.num_action + 32, batch.inputs.text.shape[1] + 4)
    padded_loss, padded_grads = _losses_and_gradients(model, objective, padded)
    assert abs(padded_loss - loss) <= 1e-6 * abs(loss)
    # Each gradient within 1e-5 of its largest entry, as the parity checks compare them (entries
    # near zero differ by summation order alone).
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(padded_grads, grads, strict=True))


def varied_lengths(case: TrainCase) -> TrainCase:
    """The case with sequences of other lengths, different within each step and from step to step
    (the pipeline pads a step's microbatches to one shape and rebuilds its stages for new shapes)."""
    generator = torch.Generator().manual_seed(7)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    batches = []
    for step, step_batches in enumerate(case.batches):
        sequences = []
        for microbatch in range(len(step_batches)):
            frames, episodes = 2 + (step + microbatch) % 3, 1 + microbatch
            samples = [
                random_sample(f"v{step}/{i}", generator, frames=frames, height=4, width=4) for i in range(episodes)
            ]
            windows = [w for sample in samples for w in cut_windows(sample, frames, 1)]
            seq = build_packed_sequence(windows, (1, 2, 2), case.pad_multiple, forward_dynamics=False)
            sequences.append((seq, objective.draw(seq, generator)))
        batches.append(sequences)
    return replace(case, batches=batches)


def test_pp2_1f1b_matches_one_process(parity_case):
    case = varied_lengths(parity_case("tiny-mot", dp_size=2))  # two microbatches per step
    record = parallel_run(case, ParallelConfig(pp=2, dp_shard=1), 2, rank_fn=pipeline_train_rank)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)


def test_pp2_interleaved_1f1b_matches_one_process(parity_case):
    case = parity_case("demo-mot", dp_size=2)  # 4 depths: 2 virtual stages per rank
    record = parallel_run(case, ParallelConfig(pp=2, pp_virtual_stages=2, dp_shard=1), 2, rank_fn=pipeline_train_rank)
    gaps = parity_gaps(record, reference_run(case))
    assert_small_gaps(gaps)
