"""A training run, top to bottom: processes -> model -> data -> parallel layout -> optimizer ->
resume -> loop (step, guard, checkpoint, metrics) -> final weights. The run folder
(output_dir/name) gets config.toml, data_stats.json, metrics.jsonl, loss_curve.png, checkpoints/,
ledger/, model.safetensors and model_config.json. The parts live in their own modules:
distributed.py (processes, layout, mesh), data/source.py, resume.py, ledger.py, guard.py (non-finite
steps), metrics_window.py, profiling.py, ema.py,
step.py (the objective of one step for every layout)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from lbva.checkpoints_tools.manager import CheckpointManager, RetentionPolicy, committed_steps
from lbva.checkpoints_tools.train_state import TrainState
from lbva.errors import UserError
from lbva.models.mot import LingBotVA
from lbva.models.weights import WeightImportError, import_wan_video_stream
from lbva.parallelism.fp8 import apply_fp8
from lbva.parallelism.grad_norm import clip_grad_norm_
from lbva.parallelism.parallelize import parallelize, step_layout_for
from lbva.parallelism.mesh import MESH_DIMS
from lbva.parallelism.pipeline import Pipeline, build_pipeline
from lbva.parallelism.step_layout import StepLayout

from .config import TrainConfig
from .config_io import config_to_dict, dump_toml
from .data.packing import PackedSequence
from .data.reader import DataError
from .data.source import ValidationSet, build_training_data, check_data_config
from .distributed import Processes, checkpoint_group, mean_over, start_processes, sum_over
from .ema import build_ema
from .guard import DataGuard, NonFiniteGuard, parameters_finite
from .ledger import Ledger
from .metrics import MetricsLogger
from .metrics_window import MetricsWindow, model_flops_per_token, peak_tflops
from .profiling import StepProfiler
from .optim import build_optimizer, build_scheduler
from .resume import resume
from .step import FlowMatchingObjective, evaluate_objective, run_objective, weighted_terms


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # the last step reached (config.run.steps unless stopped early)
    eval_losses: dict[int, float]  # step -> validation loss (held-out sequences)
    seconds: float


def train(
    config: TrainConfig, console: Console | None = None, stop: Callable[[int], bool] | None = None
) -> TrainResult:
    """Optimizer steps up to config.run.steps on this process's share of the layout; rank 0 writes the
    run folder (module docstring). `stop(step)`, asked after every step on every rank and agreed
    across ranks, checkpoints and returns early on True (preemption, time limits)."""
    check_data_config(config)  # before building a model that may be billions of parameters
    procs = start_processes(config)
    device = procs.device
    console, run_dir = open_run(config, procs, console)
    model = build_model(config, device)
    fp8 = apply_fp8(model, config.parallel.fp8, option="parallel.fp8", fsdp_float8_all_gather=procs.dims.fsdp_enabled)
    data = build_training_data(config, model, procs.dp_rank, procs.dims.dp_size)
    if procs.logging_rank:
        (run_dir / "data_stats.json").write_text(json.dumps(data.card, indent=1))
        (run_dir / "validation_keys.json").write_text(json.dumps(data.heldout_keys, indent=1))
    objective = FlowMatchingObjective(config.objective, data.empty_text)
    step_layout = step_layout_for(procs.mesh, config.model.attention)
    model, pipeline = distribute(model, procs, config, step_layout)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.run.steps, config.optim)
    state = TrainState(model, optimizer, scheduler, data.batches, ema=build_ema(model, optimizer, config.optim.ema_decay))
    checkpoints = CheckpointManager(
        run_dir / "checkpoints", RetentionPolicy(config.checkpoint.keep_last, config.checkpoint.keep_every),
        async_save=config.checkpoint.async_save, process_group=checkpoint_group())
    checkpoints.guard(optimizer)  # an optimizer step waits until an in-flight save has copied the state
    meta = checkpoint_meta(config, model, procs)
    resume(config, run_dir, checkpoints, state, meta, console)
    refuse_later_checkpoints(config, run_dir, state.step)
    saved_step = state.step  # the newest step already on disk (0: none)
    console.print(f"[bold]lbva train[/bold] {config.run.name}: preset {config.model.preset}, "
                  f"{count_parameters(model):,} parameters, {data.description}, device {device}, {procs.describe()}")

    eval_losses: dict[int, float] = {}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        logger = stack.enter_context(open_logger(config, run_dir, console, state.step)) if procs.logging_rank else None
        batches = iter(data.batches)
        if hasattr(batches, "close"):  # ends the loader workers with the run, not at interpreter exit
            stack.callback(batches.close)
        ledger = Ledger(run_dir, procs.mesh)
        stack.callback(ledger.close)
        window = MetricsWindow(config.run.log_every, config.run.steps, procs.dims.dp_size,
                               world_size=procs.world.world_size, peak_tflops=peak_tflops(device),
                               flops_per_token=model_flops_per_token(model.config, config, data.sample))
        guard = NonFiniteGuard(config.optim.max_nonfinite_steps, console, procs.dp_group, device)
        data_guard = DataGuard(config.data.max_skipped_fraction, data.batches, procs.dp_group, device)
        profiler = StepProfiler(config.run.profile_steps, run_dir, procs.logging_rank, device)
        stack.callback(profiler.close)
        for step in range(state.step + 1, config.run.steps + 1):
            profiler.before_step(step)
            seqs, waited, failure = next_sequences(batches, config.parallel.microbatches)
            data_guard.check(step, seqs, failure)
            ledger.record(step, seqs)
            terms, grad_norm, tokens = forward_backward(model, pipeline, objective, step_layout, seqs, step, config,
                                                        procs, fp8)
            updated = guard.allows_update(step, terms, grad_norm, seqs)
            if updated:
                optimizer.step()
                state.tokens_seen += tokens
            optimizer.zero_grad(set_to_none=True)
            fp8.after_optimizer_step()
            scheduler.step()
            state.step = step
            checkpoints.poll()
            if guard.stopping or config.checkpoint.every and step % config.checkpoint.every == 0:
                saved_step = save_if_finite(checkpoints, state, meta, saved_step, model, device, console)
            if guard.stopping:
                raise guard.stop_error(step, saved_step)
            window.add(terms, grad_norm, seqs, waited, skipped=not updated)
            if window.due(step):
                validation = data.validation if validation_due(step, config) else []
                metrics = close_window(window, model if pipeline is None else pipeline, objective, step_layout,
                                       validation, config, procs, lr=scheduler.get_last_lr()[0],
                                       tokens_seen=float(state.tokens_seen))
                eval_losses.update({step: metrics["loss_eval"]} if "loss_eval" in metrics else {})
                if logger is not None:
                    logger.log(step, metrics)
            profiler.after_step(step)
            if stop is not None and stop(step):
                console.print(f"stopping at step {step} as asked; checkpointing")
                break
        saved_step = save_if_finite(checkpoints, state, meta, saved_step, model, device, console, last=True)
        checkpoints.close()
    save_final_weights(model, run_dir, procs)
    procs.close()
    return TrainResult(run_dir, state.step, eval_losses, time.perf_counter() - started)


def open_run(config: TrainConfig, procs: Processes, console: Console | None) -> tuple[Console, Path]:
    """This rank's console (quiet except on the logging rank) and the run directory, created with
    the resolved config.toml in it by the logging rank."""
    # soft_wrap: job logs are not terminals; rich would wrap lines at 80 columns there.
    if not procs.logging_rank or console is None:
        console = Console(quiet=not procs.logging_rank, soft_wrap=True)
    run_dir = config.run.make_dir()  # on every rank, so a path that cannot be one stops them all alike
    if procs.logging_rank:
        dump_toml(config, run_dir / "config.toml")
    return console, run_dir


def open_logger(config: TrainConfig, run_dir: Path, console: Console, start_step: int) -> MetricsLogger:
    return MetricsLogger(
        run_dir, total_steps=config.run.steps, wandb_mode=config.run.wandb, wandb_project=config.run.wandb_project,
        run_name=config.run.name, run_id=config.run.name, config=config_to_dict(config), console=console,
        start_step=start_step,
    )


def build_model(config: TrainConfig, device: torch.device) -> LingBotVA:
    torch.manual_seed(config.run.seed)
    model = LingBotVA(config.model.model_config())
    if config.model.init_from_wan is not None:
        try:
            import_wan_video_stream(model, config.model.init_from_wan)
        except WeightImportError as error:
            raise UserError(f"model.init_from_wan: {error}") from error
    return model.to(device)


def distribute(model: LingBotVA, procs: Processes, config: TrainConfig, layout: StepLayout):
    """-> (this rank's module, the pipeline or None): a pipeline stage under pp (with the full
    model's parameter names), else the model with TP/compile/checkpointing/FSDP applied."""
    if procs.dims.pp_enabled:
        pipeline = build_pipeline(model, procs.mesh, config.parallel, layout)
        return pipeline.module, pipeline
    if procs.mesh is not None:
        return parallelize(model, procs.mesh, config.parallel), None
    return model, None


def checkpoint_meta(config: TrainConfig, model: LingBotVA, procs: Processes) -> dict:
    """What a checkpoint records beside its tensors; resume compares the model part."""
    # JSON round trip: the comparison on resume sees what was written (tuples become lists).
    return json.loads(json.dumps({
        "model": asdict(model.config), "preset": config.model.preset, "config": config_to_dict(config),
        "layout": asdict(procs.dims),
    }))


def save_final_weights(model: torch.nn.Module, run_dir: Path, procs: Processes) -> None:
    """model.safetensors (full, unsharded) and model_config.json; every rank takes part in the gather."""
    if procs.dims.pp_enabled:
        weights = gather_pipeline_weights(model, procs)
    else:
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if procs.logging_rank:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, run_dir / "model.safetensors")
        (run_dir / "model_config.json").write_text(json.dumps(asdict(model.config), indent=1))


def gather_pipeline_weights(model: torch.nn.Module, procs: Processes) -> dict[str, torch.Tensor]:
    """The whole model's full state dict on the logging rank ({} elsewhere): each rank gathers its
    stages' full tensors (a collective over the rest of the mesh), then the pp group of the
    logging rank sends them to it."""
    local = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    local = {name: value.detach().cpu() for name, value in local.items()}
    if any(procs.mesh[name].get_local_rank() for name in MESH_DIMS if name != "pp"):
        return {}
    gathered: list | None = [None] * procs.dims.pp if procs.logging_rank else None
    dist.gather_object(local, gathered, group=procs.pp_group, group_dst=procs.dims.pp - 1)
    return {name: value for part in gathered for name, value in part.items()} if gathered else {}


def count_parameters(model: torch.nn.Module) -> int:
    """Full (unsharded) parameter count, also when parameters are DTensor shards."""
    return sum(p.numel() for p in model.parameters())


def sequence_generator(seed: int, step: int, sequence: int) -> torch.Generator:
    """The randomness of global sequence `sequence` of step `step` (its index in the step's global
    batch in the loader's order: data-parallel rank r's m-th sequence is m x dp + r). It depends
    only on (seed, step, sequence), so a resumed run replays it exactly, sequences of a step draw
    apart, and a layout with the same global batch draws the same for the same sequence."""
    state = np.random.SeedSequence([seed % 2**63, step + 1, sequence]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_sequences(objective, seqs: list[PackedSequence], seed: int, step: int, dp_rank: int, dp_size: int) -> list:
    """This data-parallel rank's (sequence, draws) pairs of `step`."""
    return [
        (seq, objective.draw(seq, sequence_generator(seed, step, m * dp_size + dp_rank))) for m, seq in enumerate(seqs)
    ]


def token_weights(seqs: list[PackedSequence], dp_group, dp_size: int, device) -> tuple[list[float], int]:
    """Each sequence's factor in this rank's loss: dp_size x its real tokens / the real tokens of
    the step's global batch, and that global count. Data parallelism averages gradients over dp
    ranks, so the step's gradient is that of sum_i tokens_i x loss_i / sum_i tokens_i over the
    global batch, whatever the split into ranks, pipeline microbatches or accumulated sequences."""
    total = round(mean_over(float(sum(seq.real_tokens for seq in seqs)), dp_group, device) * dp_size)
    return [dp_size * seq.real_tokens / total if total else 0.0 for seq in seqs], total


def next_sequences(batches, count: int) -> tuple[list[PackedSequence], float, DataError | None]:
    """This rank's `count` sequences of a step, the seconds the loop waited for them, and the
    DataError its loader raised instead (data.on_error='fail'), which the data guard makes every
    rank raise."""
    started = time.perf_counter()
    try:
        seqs, failure = [next(batches) for _ in range(count)], None
    except DataError as error:
        seqs, failure = [], error
    return seqs, time.perf_counter() - started, failure


def refuse_later_checkpoints(config: TrainConfig, run_dir: Path, step: int) -> None:
    """A run that starts at `step` (0: from scratch) would meet the committed checkpoints of a
    previous run into the same folder when it saves; refuse it before training, in one line.
    (checkpoint.resume=auto starts from the newest sound one, the damaged ones above it set
    aside, so it meets none.)"""
    if config.checkpoint.resume == "auto":
        return
    later = [s for s in committed_steps(run_dir / "checkpoints") if s > step]
    if later:
        start = f"starts at step {step}" if step else "starts from scratch"
        raise UserError(f"checkpoint.resume={config.checkpoint.resume}: {run_dir} already holds checkpoints up to "
                        f"step {later[-1]} and this run {start}; set checkpoint.resume=auto to continue that run, "
                        "or choose another run.name")


def validation_due(step: int, config: TrainConfig) -> bool:
    """Whether a logged `step` also validates (run.eval_every; 0: every logged step; always the last)."""
    every = config.run.eval_every
    return every == 0 or step % every == 0 or step == config.run.steps


def close_window(window: MetricsWindow, model, objective, layout: StepLayout, validation: list[ValidationSet],
                 config: TrainConfig, procs: Processes, **extra: float) -> dict[str, float]:
    """The logging window's metrics with the validation losses beside them when `validation` is
    given (absent on pipeline ranks without the last stage), equal on every data-parallel rank."""
    if validation:
        extra = {**validate(model, objective, layout, validation, config, procs), **extra}
    return window.close(procs.dp_group, procs.device, **extra)


def forward_backward(model, pipeline, objective, layout: StepLayout, seqs: list[PackedSequence], step: int,
                     config: TrainConfig, procs: Processes, fp8):
    """Draws, token weights, forward and backward of this rank's sequences of `step`, through the
    pipeline schedule when there is one; gradients clipped. -> (loss terms, global grad norm, the
    real tokens of the step's global batch)."""
    device = procs.device
    sequences = draw_sequences(objective, seqs, config.run.seed, step, procs.dp_rank, procs.dims.dp_size)
    weights, tokens = token_weights(seqs, procs.dp_group, procs.dims.dp_size, device)
    with fp8.autocast():
        if pipeline is None:
            terms, grad_norm = train_step(model, objective, layout, sequences, weights, config, device)
        else:
            terms, grad_norm = pipeline_step(pipeline, objective, sequences, weights, config, device, procs.pp_group)
    return terms, grad_norm, tokens


def save_if_finite(checkpoints: CheckpointManager, state: TrainState, meta: dict, saved_step: int, model, device,
                   console: Console, last: bool = False) -> int:
    """Checkpoint `state` unless its step is on disk already or its weights are not finite (on
    any rank). -> the newest step on disk. Weights that are not finite at the `last` save of a
    run stop it with a UserError on every rank, so such a run neither ends as a success nor
    writes model.safetensors."""
    if saved_step == state.step:
        return saved_step
    if not parameters_finite(model, device):
        kept = f"the checkpoint of step {saved_step}" if saved_step else "no checkpoint"
        if last:
            raise UserError(f"step {state.step}: the weights are not finite (an update overflowed: optim.lr or the "
                            f"data?); not checkpointed, the last good weights are in {kept}")
        console.print(f"step {state.step}: the weights are not finite; not checkpointed (the last good weights are "
                      f"in {kept})")
        return saved_step
    checkpoints.save(state.step, {"train": state}, meta)
    return state.step


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(
    model, objective, layout: StepLayout, sequences: list, weights: list[float], config: TrainConfig, device
):
    """Forward and backward of this rank's sequences of one step on a model that is not split
    into pipeline stages (one backward per sequence, gradients accumulating), then gradient
    clipping. -> (the weighted loss terms, the global gradient norm before clipping)."""
    model.train()
    terms = []
    for index, (sequence, weight) in enumerate(zip(sequences, weights, strict=True)):
        _gradient_sync(model, last=index == len(sequences) - 1, config=config)
        with _autocast(device):
            sequence_terms = run_objective(objective, model, [sequence], layout, device)
        (sequence_terms.total * weight).backward()
        terms.append(sequence_terms)
    grad_norm = clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    return weighted_terms(terms, weights), grad_norm


def _gradient_sync(model, last: bool, config: TrainConfig) -> None:
    """Before each accumulated sequence's backward: FSDP2 all-reduces over dp_replicate (HSDP) only
    after the last one, and with parallel.defer_reduce_scatter reduce-scatters only then too. The
    gradients are the same sum either way; only when the collectives run changes."""
    if not isinstance(model, FSDPModule):
        return
    model.set_requires_all_reduce(last)
    if config.parallel.defer_reduce_scatter:
        model.set_requires_gradient_sync(last)
    model.set_is_last_backward(last)


def pipeline_step(pipeline, objective, sequences: list, weights: list[float], config: TrainConfig, device, pp_group):
    """Forward and backward of this rank's microbatches of one step through the pipeline
    schedule, then gradient clipping. -> (the weighted loss terms or None off the last stage,
    the global gradient norm before clipping)."""
    for part in pipeline.model_parts:
        part.train()
    with _autocast(device):
        terms = run_objective(objective, pipeline, sequences, pipeline.layout, device, weights)
    params = [p for part in pipeline.model_parts for p in part.parameters()]
    grad_norm = clip_grad_norm_(params, config.optim.grad_clip, pp_group)
    return terms, grad_norm


VALIDATION_TERMS = ("loss", "video", "action", "fdm")


@torch.no_grad()
def validate(model, objective, layout: StepLayout, sets: list[ValidationSet], config: TrainConfig,
             procs: Processes) -> dict[str, float]:
    """Flow-matching losses on the held-out sequences with fixed draws (comparable across steps and
    runs, unlike the training loss): `loss_eval` over all of them, and `val/{source}/{term}` per
    source. The sequences are dealt round-robin to the data-parallel ranks (every rank runs as many
    forwards, the surplus with weight 0, as FSDP's collectives need) and the sums all-reduced, so
    every rank and every layout gets the same means. model: the model or the Pipeline; {} on a
    pipeline rank without the last stage."""
    for part in model.model_parts if isinstance(model, Pipeline) else [model]:
        part.eval()
    dp_rank, dp_size = procs.dp_rank, procs.dims.dp_size
    sums, has_losses = [], True
    for validation_set in sets:
        totals = [0.0] * len(VALIDATION_TERMS)
        count = len(validation_set.sequences)
        for index in range(dp_rank, -(-count // dp_size) * dp_size, dp_size):
            seq = validation_set.sequences[index % count]
            draws = objective.draw(seq, sequence_generator(0, -1, index % count))
            with _autocast(procs.device):
                terms = evaluate_objective(objective, model, (seq, draws), layout, procs.device)
            has_losses = terms is not None  # the same on every rank of a data-parallel group
            if has_losses and index < count:
                values = (terms.total, terms.video, terms.action, terms.forward_dynamics)
                totals = [t + (0.0 if v is None else v.item()) for t, v in zip(totals, values)]
        sums += totals
    if not has_losses:
        return {}
    sums = sum_over(sums, procs.dp_group, procs.device)
    metrics, overall = {}, 0.0
    for position, validation_set in enumerate(sets):
        count = len(validation_set.sequences)
        means = dict(zip(VALIDATION_TERMS, sums[position * len(VALIDATION_TERMS):(position + 1) * len(VALIDATION_TERMS)]))
        overall += means["loss"]
        for term in VALIDATION_TERMS:
            if term != "fdm" or config.objective.forward_dynamics_weight > 0:
                metrics[f"val/{validation_set.name}/{term}"] = means[term] / count
    metrics["loss_eval"] = overall / sum(len(v.sequences) for v in sets)
    return metrics
