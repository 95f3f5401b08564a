"""Each packed sequence draws its own randomness from (seed, step, its index in the step's global
batch), and the step's loss is token-weighted over the whole global batch, so how a global batch
is split (data-parallel ranks, accumulated sequences) changes neither the draws nor the training."""

import torch
import torch.distributed as dist

from lbva.models.config import get_preset
from lbva.models.masks import CLEAN, PADDING
from lbva.parallelism.mesh import ParallelConfig, ParallelDims
from lbva.parallelism.parallelize import parallelize, step_layout_for
from lbva.parallelism.step_layout import plain_layout
from lbva.training.config import TrainConfig
from lbva.training.optim import build_optimizer
from lbva.training.step import FlowMatchingObjective
from lbva.training.trainer import draw_sequences, token_weights, train_step

from harness import CPU, TrainCase, TrainRecord, build_case_model, gather_full_parameters, spawn_ranks
from helpers import tiny_sequence


def _draws_of(dp_size: int, microbatches: int, objective, seqs) -> dict[int, torch.Tensor]:
    """Global sequence index -> its video noise, over every dp rank of a step with this split."""
    noise = {}
    for rank in range(dp_size):
        mine = [seqs[m * dp_size + rank] for m in range(microbatches)]
        for m, (_, draws) in enumerate(draw_sequences(objective, mine, seed=3, step=5, dp_rank=rank, dp_size=dp_size)):
            noise[m * dp_size + rank] = draws.video_noise
    return noise


def test_every_sequence_of_a_step_draws_apart(parity_case):
    case = parity_case(steps=1)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    seqs = [tiny_sequence(0, text_dim=get_preset(case.preset).text_dim)] * 4  # the same data: only draws differ
    noise = list(_draws_of(2, 2, objective, seqs).values())
    assert all(not torch.equal(noise[a], noise[b]) for a in range(4) for b in range(a + 1, 4))


def test_a_sequence_draws_the_same_on_every_split_of_the_global_batch(parity_case):
    case = parity_case(steps=1)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    seqs = [tiny_sequence(i, text_dim=get_preset(case.preset).text_dim) for i in range(4)]
    one_process, data_parallel, accumulated = (_draws_of(d, 4 // d, objective, seqs) for d in (1, 4, 2))
    for index in range(4):
        assert torch.equal(one_process[index], data_parallel[index])
        assert torch.equal(one_process[index], accumulated[index])


def _train(case: TrainCase, model, layout, dp_rank: int, dp_size: int, dp_group,
           parallel: ParallelConfig | None = None) -> TrainRecord:
    """The trainer's step on this rank's share of each global batch: sequence m of dp rank r is
    global sequence m x dp + r (the loader's order)."""
    config = TrainConfig(optim=case.optim, parallel=parallel or ParallelConfig())
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    optimizer = build_optimizer(model, case.optim)
    microbatches = case.dp_size // dp_size
    losses = []
    for global_batch in case.batches:
        sequences = [global_batch[m * dp_size + dp_rank] for m in range(microbatches)]
        weights, _ = token_weights([seq for seq, _ in sequences], dp_group, dp_size, CPU)
        terms, _ = train_step(model, objective, layout, sequences, weights, config, CPU)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = terms.total.detach().clone()
        if dp_group is not None:
            dist.all_reduce(loss, group=dp_group)
        losses.append(loss.item() / dp_size)
    return TrainRecord(losses, {}, gather_full_parameters(model))


def accumulating_rank(case: TrainCase, parallel: ParallelConfig) -> TrainRecord:
    dims = ParallelDims.resolve(parallel, dist.get_world_size(), model=get_preset(case.preset),
                                token_budget=case.token_budget, pad_multiple=case.pad_multiple)
    mesh = dims.build_mesh("cpu")
    model = parallelize(build_case_model(case), mesh, parallel)
    return _train(case, model, step_layout_for(mesh, "sdpa"), mesh.dp_rank, dims.dp_size, mesh.dp.get_group(), parallel)


def _with_uneven_padding(case: TrainCase) -> TrainCase:
    """Sequences with different real token counts (the last 16 x i video tokens of sequence i made
    padding), so token weighting differs from a plain mean."""
    for global_batch in case.batches:
        for index, (seq, _) in enumerate(global_batch):
            cut = 16 * index
            if cut:
                seq.video_sample[-cut:] = PADDING
                seq.video_role[-cut:] = CLEAN
    return case


def _assert_trains_alike(runs: list[TrainRecord], one_process: TrainRecord) -> None:
    for run in runs:
        for got, expected in zip(run.losses, one_process.losses, strict=True):
            assert abs(got - expected) <= 1e-5 * abs(expected), (run.losses, one_process.losses)
        for name, expected in one_process.parameters.items():
            assert (run.parameters[name] - expected).abs().max().item() <= 1e-5, name


def test_dp2_accumulating_2_trains_as_dp4_and_as_one_process_accumulating_4(parity_case):
    case = _with_uneven_padding(parity_case("tiny-mot", dp_size=4))
    one_process = _train(case, build_case_model(case), plain_layout("sdpa"), 0, 1, None)
    dp4 = spawn_ranks(4, accumulating_rank, case, ParallelConfig(dp_shard=4))[0]
    dp2 = spawn_ranks(2, accumulating_rank, case, ParallelConfig(dp_shard=2))[0]
    _assert_trains_alike([dp4, dp2], one_process)


def test_gradient_reductions_deferred_to_the_last_accumulated_sequence_train_alike(parity_case):
    """Replicated ranks all-reduce once per step, after the last sequence; with
    defer_reduce_scatter sharded ranks reduce-scatter once too. The sum is the same."""
    case = _with_uneven_padding(parity_case("tiny-mot", dp_size=4))
    one_process = _train(case, build_case_model(case), plain_layout("sdpa"), 0, 1, None)
    replicated = spawn_ranks(2, accumulating_rank, case, ParallelConfig(dp_replicate=2, dp_shard=1))[0]
    deferred = spawn_ranks(2, accumulating_rank, case, ParallelConfig(dp_shard=2, defer_reduce_scatter=True))[0]
    _assert_trains_alike([replicated, deferred], one_process)
