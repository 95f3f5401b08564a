"""Where a run resumes from, and loading it: the checkpoint must hold this model and be whole."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from lbva.checkpoints_tools.manager import CheckpointError, CheckpointManager, read_meta, saved_parts
from lbva.checkpoints_tools.train_state import TrainState
from lbva.errors import UserError

from .config import TrainConfig
from .optim import apply_optim_config, lr_factor


def resolve_resume(config: TrainConfig, run_dir: Path, checkpoints: CheckpointManager,
                   console: Console) -> Path | None:
    """The checkpoint to resume from, verified (sizes and checksums recorded at save time); every
    rank calls it and gets the same answer. checkpoint.resume: "none"; a folder, refused with a
    line when damaged; "auto": the newest sound checkpoint of the run (None when it has none), the
    damaged ones above it set aside as step_N.damaged and named in the log, refused with a line
    when every checkpoint of the run is damaged."""
    choice = config.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return _newest_sound(run_dir / "checkpoints", checkpoints, console)
    folder = Path(choice)
    if not folder.is_dir():
        raise UserError(f"checkpoint.resume: {folder} is not a checkpoint folder")
    problems = checkpoints.verify(folder)
    if problems:
        raise UserError(f"checkpoint.resume: {folder} is damaged: {'; '.join(problems)}")
    return folder


def _newest_sound(root: Path, checkpoints: CheckpointManager, console: Console) -> Path | None:
    folder, damaged = checkpoints.newest_sound(root)
    if folder is None and damaged:
        found = "; ".join(f"{path.name}: {', '.join(problems)}" for path, problems in damaged.items())
        raise UserError(f"checkpoint.resume=auto: every checkpoint under {root} is damaged ({found}); "
                        "resume from another run's checkpoint or start afresh with checkpoint.resume=none")
    for path, moved in zip(damaged, checkpoints.set_aside(list(damaged))):
        console.print(f"checkpoint.resume=auto: {path} is damaged ({'; '.join(damaged[path])}); "
                      f"set aside as {moved.name}", soft_wrap=True)
    if damaged:
        console.print(f"checkpoint.resume=auto: falling back to the newest sound checkpoint, {folder}",
                      soft_wrap=True)
    return folder


def resume(config: TrainConfig, run_dir: Path, checkpoints: CheckpointManager, state: TrainState, meta: dict,
           console: Console) -> None:
    """Load the checkpoint checkpoint.resume names into `state` (nothing when there is none); the
    current config's schedule governs from there, so a run may be extended on resume."""
    folder = resolve_resume(config, run_dir, checkpoints, console)
    if folder is None:
        return
    missing = load_checkpoint(checkpoints, folder, state, meta)
    if "ema" in missing and state.ema is not None:
        console.print(f"{folder} holds no EMA of the weights: the average starts from the resumed weights")
    if state.step > 0:  # an optimizer and schedule were loaded: the config's settings replace theirs
        saved_config = read_meta(folder).get("config", {})
        for change in apply_optim_config(state.optimizer, state.scheduler, config, saved_config, state.step):
            console.print(f"resume: {change} (the config wins over the checkpoint)")
    else:
        for group in state.optimizer.param_groups:
            group["lr"] = config.optim.lr * lr_factor(state.step, config.run.steps, config.optim)
    console.print(f"resumed from {folder} at step {state.step}", soft_wrap=True)  # one line in job logs


def load_checkpoint(checkpoints: CheckpointManager, folder: Path, state: TrainState, meta: dict) -> set[str]:
    """Load `folder` (verified: as resolve_resume returns it) into `state`; refuse a checkpoint of
    another model. -> the optional parts of TrainState the checkpoint lacks (they keep their fresh
    values)."""
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
    try:
        if saved.get("contents") == "weights":  # an imported step-0 checkpoint: model only
            weights = {"train": {"model": get_model_state_dict(state.model)}}
            checkpoints.load(folder, weights)
            set_model_state_dict(state.model, weights["train"]["model"])
            return set(state.OPTIONAL)
        else:
            missing = {part for part in state.OPTIONAL if part not in saved_parts(folder)}
            with state.without(missing):
                checkpoints.load(folder, {"train": state})
            return missing
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"checkpoint.resume: {folder} could not be loaded: {error}") from error
