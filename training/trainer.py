"""A training run, top to bottom: processes -> model -> data -> parallel layout -> optimizer ->
resume -> loop (step, checkpoint, metrics) -> final weights. The parts live in their own modules:
distributed.py (processes, layout, mesh), data/source.py, resume.py, ledger.py, metrics_window.py,
step.py (the objective of one step for every layout)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lbva.checkpoints_tools.manager import CheckpointManager, RetentionPolicy
from lbva.checkpoints_tools.train_state import TrainState
from lbva.errors import UserError
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.models.weights import WeightImportError, import_wan_video_stream
from lbva.parallelism.fp8 import apply_fp8
from lbva.parallelism.grad_norm import clip_grad_norm_
from lbva.parallelism.parallelize import parallelize, step_layout_for
from lbva.parallelism.pipeline import build_pipeline
from lbva.parallelism.step_layout import StepLayout

from .config import TrainConfig
from .config_io import config_to_dict, dump_toml
from .data.packing import PackedSequence
from .data.source import build_training_data, check_data_config
from .distributed import Processes, checkpoint_group, mean_over, start_processes
from .ledger import Ledger
from .metrics import MetricsLogger
from .metrics_window import MetricsWindow
from .optim import build_optimizer, build_scheduler
from .resume import resume
from .step import FlowMatchingObjective, run_objective


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # the last step reached (config.run.steps unless stopped early)
    eval_losses: dict[int, float]  # step -> loss on the fixed evaluation batch
    seconds: float


def train(
    config: TrainConfig, console: Console | None = None, stop: Callable[[int], bool] | None = None
) -> TrainResult:
    """Run optimizer steps up to config.run.steps on this process's share of the parallel layout
    (one process, or one rank under torchrun); rank 0 writes config.toml, metrics.jsonl,
    loss_curve.png, checkpoints, model.safetensors and data_stats.json into output_dir/name.
    `stop(step)` is asked after every step on every rank (it must agree across ranks); True
    checkpoints and returns early (preemption, time limits)."""
    check_data_config(config)  # before building a model that may be billions of parameters
    procs = start_processes(config)
    device = procs.device
    console, run_dir = open_run(config, procs, console)
    model = build_model(config, device)
    fp8 = apply_fp8(model, config.parallel.fp8, option="parallel.fp8", fsdp_float8_all_gather=procs.dims.fsdp_enabled)
    data = build_training_data(config, model, procs.dp_rank, procs.dims.dp_size)
    if procs.logging_rank:
        (run_dir / "data_stats.json").write_text(json.dumps(data.card, indent=1))
    objective = FlowMatchingObjective(config.objective, data.empty_text)
    step_layout = step_layout_for(procs.mesh, config.model.attention)
    model, pipeline = distribute(model, procs, config, step_layout)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.run.steps, config.optim)
    state = TrainState(model, optimizer, scheduler, data.batches)
    checkpoints = CheckpointManager(
        run_dir / "checkpoints", RetentionPolicy(config.checkpoint.keep_last, config.checkpoint.keep_every),
        async_save=config.checkpoint.async_save, process_group=checkpoint_group(),
    )
    meta = checkpoint_meta(config, model, procs)
    resume(config, run_dir, checkpoints, state, meta, console)
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
        window = MetricsWindow(config.run.log_every, config.run.steps, procs.dims.dp_size)
        for step in range(state.step + 1, config.run.steps + 1):
            seqs = [next(batches) for _ in range(config.parallel.microbatches)]
            ledger.record(step, seqs)
            with fp8.autocast():
                if pipeline is None:
                    terms, grad_norm = train_step(model, objective, step_layout, seqs[0], optimizer, config, device, step)
                else:
                    terms, grad_norm = pipeline_step(pipeline, objective, seqs, optimizer, config, device, step,
                                                     procs.pp_group)
            fp8.after_optimizer_step()
            scheduler.step()
            state.step = step
            checkpoints.poll()
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                checkpoints.save(step, {"train": state}, meta)
                saved_step = step
            window.add(terms, grad_norm, seqs)
            if window.due(step):
                extra = {}
                if pipeline is None:  # the evaluation batch runs forward-only, which the schedule does not
                    loss = evaluate(model, objective, step_layout, data.eval_batch, config, device)
                    extra["loss_eval"] = eval_losses[step] = mean_over(loss, procs.dp_group, device)
                metrics = window.close(procs.dp_group, device, **extra, lr=scheduler.get_last_lr()[0])
                if logger is not None:
                    logger.log(step, metrics)
            if stop is not None and stop(step):
                console.print(f"stopping at step {step} as asked; checkpointing")
                break
        if saved_step != state.step:
            checkpoints.save(state.step, {"train": state}, meta)
        checkpoints.wait()
    if pipeline is None:  # pipeline stages each hold part of the model: the checkpoint is the whole of it
        save_final_weights(model, run_dir, procs.logging_rank)
    procs.close()
    return TrainResult(run_dir, state.step, eval_losses, time.perf_counter() - started)


def open_run(config: TrainConfig, procs: Processes, console: Console | None) -> tuple[Console, Path]:
    """This rank's console (quiet except on the logging rank) and the run directory, created with
    the resolved config.toml in it by the logging rank."""
    # soft_wrap: job logs are not terminals; rich would wrap lines at 80 columns there.
    if not procs.logging_rank or console is None:
        console = Console(quiet=not procs.logging_rank, soft_wrap=True)
    run_dir = config.run.output_dir / config.run.name
    if procs.logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
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
    model = LingBotVA(get_preset(config.model.preset))
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
        return pipeline.model_parts[0], pipeline
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


def save_final_weights(model: torch.nn.Module, run_dir: Path, logging_rank: bool) -> None:
    """model.safetensors (full, unsharded) and model_config.json; every rank takes part in the gather."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if logging_rank:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, run_dir / "model.safetensors")
        (run_dir / "model_config.json").write_text(json.dumps(asdict(model.config), indent=1))


def count_parameters(model: torch.nn.Module) -> int:
    """Full (unsharded) parameter count, also when parameters are DTensor shards."""
    return sum(p.numel() for p in model.parameters())


def step_generator(seed: int, step: int) -> torch.Generator:
    """Each step's randomness depends only on (seed, step), so a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
def train_step(
    model, objective, layout: StepLayout, seq: PackedSequence, optimizer, config: TrainConfig, device, step: int
):
    """One optimizer step of a model that is not split into pipeline stages, on this rank's part
    of `layout` (parallelize.step_layout_for)."""
    model.train()
    draws = objective.draw(seq, step_generator(config.run.seed, step))
    with _autocast(device):
        terms = run_objective(objective, model, [(seq, draws)], layout, device)
    terms.total.backward()
    grad_norm = clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return terms, grad_norm


def pipeline_step(pipeline, objective, seqs, optimizer, config: TrainConfig, device, step: int, pp_group):
    """One optimizer step over this dp rank's microbatches through the pipeline schedule. Every
    microbatch draws from the step's generator, as every dp rank does without pipeline stages."""
    for part in pipeline.model_parts:
        part.train()
    sequences = [(seq, objective.draw(seq, step_generator(config.run.seed, step))) for seq in seqs]
    with _autocast(device):
        terms = run_objective(objective, pipeline, sequences, pipeline.layout, device)
    params = [p for part in pipeline.model_parts for p in part.parameters()]
    grad_norm = clip_grad_norm_(params, config.optim.grad_clip, pp_group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return terms, grad_norm


@torch.no_grad()
def evaluate(model, objective, layout: StepLayout, seq: PackedSequence, config: TrainConfig, device) -> float:
    """Loss on one fixed batch with fixed draws: comparable across steps, unlike the training loss,
    whose per-frame noise levels change every step."""
    model.eval()
    draws = objective.draw(seq, step_generator(config.run.seed, -1))
    with _autocast(device):
        return run_objective(objective, model, [(seq, draws)], layout, device).total.item()
