"""The single-process training run, top to bottom: config -> model -> data -> loop -> artifacts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from safetensors.torch import save_file

from lbva.checkpoints_tools.manager import (
    CheckpointError, CheckpointManager, RetentionPolicy, latest_checkpoint, read_meta, verify,
)
from lbva.checkpoints_tools.train_state import TrainState
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.models.weights import WeightImportError, import_wan_video_stream

from .config import TrainConfig
from .config_io import config_to_dict, dump_toml
from .data_source import build_training_data, check_data_config
from .errors import UserError
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


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


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


def _loss_metrics(terms: LossTerms) -> dict[str, float]:
    metrics = {"loss": terms.total.item(), "loss_video": terms.video.item(), "loss_action": terms.action.item()}
    if terms.forward_dynamics is not None:
        metrics["loss_fdm"] = terms.forward_dynamics.item()
    return metrics


def train(
    config: TrainConfig, console: Console | None = None, stop: Callable[[int], bool] | None = None
) -> TrainResult:
    """Run optimizer steps up to config.run.steps; write config.toml, metrics.jsonl,
    loss_curve.png, checkpoints, model.safetensors and data_stats.json into output_dir/name.

    `stop(step)` is asked after every step; when it answers True the run checkpoints and returns
    early (preemption, time limits). Returns the evaluation losses and the last step reached."""
    console = console or Console()
    check_data_config(config)  # before building a model that may be billions of parameters
    device = resolve_device(config.run.device)
    run_dir = config.run.output_dir / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_toml(config, run_dir / "config.toml")

    model = build_model(config, device)
    data = build_training_data(config, model)
    (run_dir / "data_stats.json").write_text(json.dumps(data.card, indent=1))
    objective = FlowMatchingObjective(config.objective, data.empty_text)
    stream, eval_batch = data.batches, data.eval_batch
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.run.steps, config.optim)
    state = TrainState(model, optimizer, scheduler, stream)
    checkpoints = CheckpointManager(
        run_dir / "checkpoints",
        RetentionPolicy(config.checkpoint.keep_last, config.checkpoint.keep_every),
        async_save=config.checkpoint.async_save,
    )
    # JSON round trip: the comparison on resume sees what was written (tuples become lists).
    checkpoint_meta = json.loads(json.dumps(
        {"model": asdict(model.config), "preset": config.model.preset, "config": config_to_dict(config)}
    ))
    resume_from = resolve_resume(config, run_dir)
    if resume_from is not None:
        load_checkpoint(checkpoints, resume_from, state, checkpoint_meta)
        # The current config's schedule governs from here (a run may be extended on resume).
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * lr_factor(state.step, config.run.steps, config.optim)
        console.print(f"resumed from {resume_from} at step {state.step}")
    saved_step = state.step  # the newest step already on disk (0: none)
    batches = iter(stream)
    console.print(
        f"[bold]lbva train[/bold] {config.run.name}: preset {config.model.preset}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {data.description}, device {device}"
    )

    eval_losses: dict[int, float] = {}
    started = time.perf_counter()
    with MetricsLogger(
        run_dir, total_steps=config.run.steps, wandb_mode=config.run.wandb, wandb_project=config.run.wandb_project,
        run_name=config.run.name, run_id=config.run.name, config=config_to_dict(config), console=console,
        start_step=state.step,
    ) as logger:
        window_sums: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(state.step + 1, config.run.steps + 1):
            seq = next(batches)
            terms, grad_norm = train_step(model, objective, seq, optimizer, config, device, step)
            scheduler.step()
            state.step = step
            checkpoints.poll()
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                checkpoints.save(step, {"train": state}, checkpoint_meta)
                saved_step = step
            for key, value in {**_loss_metrics(terms), "grad_norm": grad_norm}.items():
                window_sums[key] = window_sums.get(key, 0.0) + value
            window_tokens += seq.real_tokens
            if step % config.run.log_every == 0 or step == config.run.steps:
                steps_in_window = (step - 1) % config.run.log_every + 1
                elapsed = time.perf_counter() - window_start
                eval_losses[step] = evaluate(model, objective, eval_batch, config, device)
                metrics = {key: total / steps_in_window for key, total in window_sums.items()}
                metrics.update(loss_eval=eval_losses[step], lr=scheduler.get_last_lr()[0],
                               tokens_per_s=window_tokens / elapsed)
                logger.log(step, metrics)
                window_sums, window_tokens, window_start = {}, 0, time.perf_counter()
            if stop is not None and stop(step):
                console.print(f"stopping at step {step} as asked; checkpointing")
                break
        if saved_step != state.step:
            checkpoints.save(state.step, {"train": state}, checkpoint_meta)
        checkpoints.wait()

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, run_dir / "model.safetensors")
    (run_dir / "model_config.json").write_text(json.dumps(asdict(model.config), indent=1))
    return TrainResult(run_dir, state.step, eval_losses, time.perf_counter() - started)


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
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip).item()
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
