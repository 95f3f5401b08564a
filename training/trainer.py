"""The single-process training run, top to bottom: config -> model -> data -> loop -> artifacts."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from safetensors.torch import save_file

from lbva.checkpoints_tools.manager import (
    CheckpointError, CheckpointManager, RetentionPolicy, latest_checkpoint, read_meta, verify,
)
from lbva.checkpoints_tools.train_state import TrainState
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.models.weights import WeightImportError, import_wan_video_stream
from lbva.parallelism.context_parallel import ContextParallel, ContextParallelObjective
from lbva.parallelism.fp8 import apply_fp8
from lbva.parallelism.grad_norm import clip_grad_norm_
from lbva.parallelism.mesh import MESH_DIMS, ParallelDims
from lbva.parallelism.parallelize import parallelize
from lbva.parallelism.pipeline import build_pipeline

from .config import TrainConfig
from .config_io import config_to_dict, dump_toml
from .data_source import build_training_data, check_data_config
from .distributed import checkpoint_group, init_distributed, mean_over, world_from_env
from lbva.errors import UserError
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler, lr_factor
from .packing import PackedSequence
from .step import FlowMatchingObjective, LossTerms


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # the last step reached (config.run.steps unless stopped early)
    eval_losses: dict[int, float]  # step -> loss on the fixed evaluation batch
    seconds: float


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if choice == "cuda" else torch.device("cpu")


def step_generator(seed: int, step: int) -> torch.Generator:
    """Each step's randomness depends only on (seed, step), so a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


def build_model(config: TrainConfig, device: torch.device) -> LingBotVA:
    torch.manual_seed(config.run.seed)
    model = LingBotVA(get_preset(config.model.preset))
    if config.model.init_from_wan is not None:
        try:
            import_wan_video_stream(model, config.model.init_from_wan)
        except WeightImportError as error:
            raise UserError(f"model.init_from_wan: {error}") from error
    return model.to(device)


def _loss_metrics(terms: LossTerms | None) -> dict[str, float]:
    if terms is None:  # a pipeline rank without the last stage: the logging rank reports losses
        return {}
    metrics = {"loss": terms.total.item(), "loss_video": terms.video.item(), "loss_action": terms.action.item()}
    if terms.forward_dynamics is not None:
        metrics["loss_fdm"] = terms.forward_dynamics.item()
    return metrics


def train(
    config: TrainConfig, console: Console | None = None, stop: Callable[[int], bool] | None = None
) -> TrainResult:
    """Run optimizer steps up to config.run.steps on this process's share of the parallel layout
    (one process, or one rank under torchrun); write config.toml, metrics.jsonl, loss_curve.png,
    checkpoints, model.safetensors and data_stats.json into output_dir/name (rank 0 writes).

    `stop(step)` is asked after every step, on every rank; when it answers True the run
    checkpoints and returns early (preemption, time limits): the answer must agree across ranks.
    Returns the evaluation losses and the last step reached."""
    check_data_config(config)  # before building a model that may be billions of parameters
    world = world_from_env()
    device = resolve_device(config.run.device, world.local_rank)
    dims = ParallelDims.resolve(
        config.parallel, world.world_size, model=get_preset(config.model.preset),
        token_budget=config.data.token_budget, pad_multiple=config.data.pad_multiple,
    )
    if dims.pp_enabled and config.parallel.pp_virtual_stages > 1:
        raise UserError("parallel.pp_virtual_stages > 1: the trainer drives one pipeline stage per rank (1F1B); "
                        "interleaved stages are built and tested in parallelism/pipeline.py only")
    if not dims.pp_enabled and config.parallel.microbatches != 1:
        raise UserError(f"parallel.microbatches={config.parallel.microbatches} needs pipeline stages (parallel.pp > 1)")
    init_distributed(world, device)
    mesh = dims.build_mesh(device.type) if world.distributed else None
    logging_rank = mesh is None or mesh.is_logging_rank
    # soft_wrap: job logs are not terminals; rich would wrap lines at 80 columns there.
    console = console if logging_rank and console is not None else Console(quiet=not logging_rank, soft_wrap=True)
    run_dir = config.run.output_dir / config.run.name
    if logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_toml(config, run_dir / "config.toml")

    model = build_model(config, device)
    if config.parallel.fp8 == "te" and dims.tp_enabled:
        raise UserError("parallel.fp8=te with parallel.tp > 1: TE layers hold plain local shards, which "
                        "the DTensor TP plan does not compose with; use parallel.fp8=torchao")
    fp8 = apply_fp8(model, config.parallel.fp8, option="parallel.fp8", fsdp_float8_all_gather=dims.fsdp_enabled)
    data = build_training_data(config, model, mesh.dp_rank if mesh is not None else 0, dims.dp_size)
    objective = FlowMatchingObjective(config.objective, data.empty_text)
    pipeline = None
    if dims.pp_enabled:
        pipeline = build_pipeline(model, mesh, config.parallel, objective, config.model.attention)
        model = pipeline.model_parts[0]  # this rank's stage, with the full model's parameter names
    elif mesh is not None:
        model = parallelize(model, mesh, config.parallel)
    if dims.cp_enabled and pipeline is None:
        objective = ContextParallelObjective(objective, ContextParallel.from_mesh(mesh))
    dp_group = mesh.dp.get_group() if mesh is not None and dims.dp_enabled else None
    pp_group = mesh["pp"].get_group() if pipeline is not None else None
    if logging_rank:
        (run_dir / "data_stats.json").write_text(json.dumps(data.card, indent=1))
    stream, eval_batch = data.batches, data.eval_batch
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.run.steps, config.optim)
    state = TrainState(model, optimizer, scheduler, stream)
    checkpoints = CheckpointManager(
        run_dir / "checkpoints",
        RetentionPolicy(config.checkpoint.keep_last, config.checkpoint.keep_every),
        async_save=config.checkpoint.async_save,
        process_group=checkpoint_group(),
    )
    # JSON round trip: the comparison on resume sees what was written (tuples become lists).
    checkpoint_meta = json.loads(json.dumps({
        "model": asdict(model.config), "preset": config.model.preset, "config": config_to_dict(config),
        "layout": asdict(dims),
    }))
    resume_from = resolve_resume(config, run_dir)
    if resume_from is not None:
        load_checkpoint(checkpoints, resume_from, state, checkpoint_meta)
        # The current config's schedule governs from here (a run may be extended on resume).
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * lr_factor(state.step, config.run.steps, config.optim)
        console.print(f"resumed from {resume_from} at step {state.step}")
    saved_step = state.step  # the newest step already on disk (0: none)
    batches = iter(stream)
    ledger = open_ledger(run_dir, mesh)
    layout = " x ".join(f"{name} {getattr(dims, name)}" for name in MESH_DIMS if getattr(dims, name) > 1)
    console.print(
        f"[bold]lbva train[/bold] {config.run.name}: preset {config.model.preset}, "
        f"{count_parameters(model):,} parameters, {data.description}, device {device}, "
        f"{world.world_size} process(es){', ' + layout if layout else ''}"
    )

    eval_losses: dict[int, float] = {}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        logger = stack.enter_context(MetricsLogger(
            run_dir, total_steps=config.run.steps, wandb_mode=config.run.wandb,
            wandb_project=config.run.wandb_project, run_name=config.run.name, run_id=config.run.name,
            config=config_to_dict(config), console=console, start_step=state.step,
        )) if logging_rank else None
        if hasattr(batches, "close"):  # ends the loader workers with the run, not at interpreter exit
            stack.callback(batches.close)
        window_sums: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(state.step + 1, config.run.steps + 1):
            seqs = [next(batches) for _ in range(config.parallel.microbatches)]
            if ledger is not None:
                windows = [key for seq in seqs for key in seq.window_keys]
                ledger.write(json.dumps({"step": step, "windows": windows}) + "\n")
                ledger.flush()
            with fp8.autocast():
                if pipeline is None:
                    terms, grad_norm = train_step(model, objective, seqs[0], optimizer, config, device, step)
                else:
                    terms, grad_norm = pipeline_step(pipeline, objective, seqs, optimizer, config, device, step,
                                                     pp_group)
            fp8.after_optimizer_step()
            scheduler.step()
            state.step = step
            checkpoints.poll()
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                checkpoints.save(step, {"train": state}, checkpoint_meta)
                saved_step = step
            for key, value in {**_loss_metrics(terms), "grad_norm": grad_norm}.items():
                window_sums[key] = window_sums.get(key, 0.0) + value
            window_tokens += sum(seq.real_tokens for seq in seqs)
            if step % config.run.log_every == 0 or step == config.run.steps:
                steps_in_window = (step - 1) % config.run.log_every + 1
                elapsed = time.perf_counter() - window_start
                if pipeline is None:  # the evaluation batch runs forward-only, which the schedule does not
                    eval_losses[step] = mean_over(
                        evaluate(model, objective, eval_batch, config, device), dp_group, device
                    )
                metrics = {
                    key: mean_over(total / steps_in_window, dp_group, device) for key, total in window_sums.items()
                }
                # grad_norm is global already; tokens add up over the data-parallel ranks.
                metrics["grad_norm"] = window_sums["grad_norm"] / steps_in_window
                if step in eval_losses:
                    metrics["loss_eval"] = eval_losses[step]
                metrics.update(lr=scheduler.get_last_lr()[0], tokens_per_s=window_tokens * dims.dp_size / elapsed)
                if logger is not None:
                    logger.log(step, metrics)
                window_sums, window_tokens, window_start = {}, 0, time.perf_counter()
            if stop is not None and stop(step):
                console.print(f"stopping at step {step} as asked; checkpointing")
                break
        if saved_step != state.step:
            checkpoints.save(state.step, {"train": state}, checkpoint_meta)
        checkpoints.wait()
    if ledger is not None:
        ledger.close()

    # Pipeline stages each hold part of the model: the checkpoint is the whole of it there.
    full_weights = None if pipeline is not None else get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if logging_rank and full_weights is not None:
        save_file({k: v.detach().contiguous() for k, v in full_weights.items()}, run_dir / "model.safetensors")
        (run_dir / "model_config.json").write_text(json.dumps(asdict(model.config), indent=1))
    if world.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(run_dir, state.step, eval_losses, time.perf_counter() - started)


def open_ledger(run_dir: Path, mesh):
    """The sample ledger of this data-parallel rank: one JSON line per step naming the windows it
    trained on (run_dir/ledger/dp{rank}.jsonl, appended across restarts; a resumed run rewrites the
    steps after its checkpoint, so the last line of a step is the one that counts). Written by one
    rank per data-parallel group; None on the others."""
    if mesh is not None and any(mesh[name].size() > 1 and mesh[name].get_local_rank() > 0 for name in ("tp", "cp")):
        return None
    dp_rank = mesh.dp_rank if mesh is not None else 0
    folder = run_dir / "ledger"
    folder.mkdir(parents=True, exist_ok=True)
    return (folder / f"dp{dp_rank}.jsonl").open("a")


def read_ledger(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(dp rank, step) -> windows, the last write of each step winning."""
    entries: dict[tuple[int, int], list[str]] = {}
    for path in sorted((run_dir / "ledger").glob("dp*.jsonl")):
        dp_rank = int(path.stem[2:])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            entries[(dp_rank, record["step"])] = record["windows"]
    return entries


def count_parameters(model: torch.nn.Module) -> int:
    """Full (unsharded) parameter count, also when parameters are DTensor shards."""
    return sum(p.numel() for p in model.parameters())


def resolve_resume(config: TrainConfig, run_dir: Path) -> Path | None:
    choice = config.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    folder = Path(choice)
    if not folder.is_dir():
        raise UserError(f"checkpoint.resume: {folder} is not a checkpoint folder")
    return folder


def load_checkpoint(checkpoints: CheckpointManager, folder: Path, state: TrainState, meta: dict) -> None:
    """Load `folder` into `state`; refuse a checkpoint of another model or with damaged files."""
    try:
        saved = read_meta(folder)
    except CheckpointError as error:
        raise UserError(f"checkpoint.resume: {error}") from error
    differing = [k for k in meta["model"] if saved.get("model", {}).get(k) != meta["model"][k]]
    if differing:
        fields = ", ".join(f"{k} {saved.get('model', {}).get(k)!r} != {meta['model'][k]!r}" for k in differing)
        raise UserError(
            f"checkpoint.resume: {folder} holds another model (preset {saved.get('preset')!r}): {fields}"
        )
    problems = verify(folder, checksums=False)
    if problems:
        raise UserError(f"checkpoint.resume: {folder} is damaged: {'; '.join(problems)}")
    try:
        if saved.get("contents") == "weights":  # an imported step-0 checkpoint: model only
            weights = {"train": {"model": get_model_state_dict(state.model)}}
            checkpoints.load(folder, weights)
            set_model_state_dict(state.model, weights["train"]["model"])
        else:
            checkpoints.load(folder, {"train": state})
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"checkpoint.resume: {folder} could not be loaded: {error}") from error


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model, objective, seq: PackedSequence, optimizer, config: TrainConfig, device, step: int):
    model.train()
    draws = objective.draw(seq, step_generator(config.run.seed, step))
    with _autocast(device):
        terms = objective(model, seq, draws, config.model.attention, device)
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
    batches = []
    for seq in seqs:
        draws = objective.draw(seq, step_generator(config.run.seed, step))
        batches.append(objective.prepare(seq, draws, pipeline.model_parts[0].config.patch_size, device))
    with _autocast(device):
        terms = pipeline.step(batches)
    params = [p for part in pipeline.model_parts for p in part.parameters()]
    grad_norm = clip_grad_norm_(params, config.optim.grad_clip, pp_group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return terms, grad_norm


@torch.no_grad()
def evaluate(model, objective, seq: PackedSequence, config: TrainConfig, device) -> float:
    """Loss on one fixed batch with fixed draws: comparable across steps, unlike the training loss,
    whose per-frame noise levels change every step."""
    model.eval()
    draws = objective.draw(seq, step_generator(config.run.seed, -1))
    with _autocast(device):
        return objective(model, seq, draws, config.model.attention, device).total.item()
