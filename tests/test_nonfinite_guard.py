"""A step whose loss or gradient norm is not finite is skipped alike on every rank (no optimizer
update), counted in the metrics; optim.max_nonfinite_steps in a row stop the run with a one-line
UserError after checkpointing the last good weights."""

import math

import pytest
import torch
from rich.console import Console
from torch.distributed.tensor import DTensor

from lbva.checkpoints_tools.manager import committed_steps
from lbva.errors import UserError
from lbva.training import trainer
from lbva.training.config import TrainConfig
from lbva.training.config_io import load_config
from lbva.training.metrics import read_metrics

from helpers import prepared_demo


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=4, frames_per_episode=33, image_size=64, seed=1)


def nonfinite_config(dataset, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, overrides=[
        "model.preset=tiny-mot", f"data.prepared=['{dataset}']", f"run.output_dir={out}", "data.text_tokens=8",
        "data.window_frames=8", "data.token_budget=512", "data.pad_multiple=32", "optim.warmup_steps=0",
        "checkpoint.async_save=false", *overrides,
    ])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def poison_gradients(monkeypatch, bad_steps: set[int], only_rank: int | None = None) -> list[int]:
    """From now on the trainer's gradient clipping sees a NaN gradient at the (1-based) steps
    `bad_steps` (on `only_rank` alone, if given); returns the list the optimizer's steps are
    counted in."""
    original_clip, original_build = trainer.clip_grad_norm_, trainer.build_optimizer
    calls, updates = [0], []

    def clip(parameters, *args):
        parameters = list(parameters)
        calls[0] += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if calls[0] in bad_steps and only_rank in (None, rank):
            # Under FSDP a small parameter's shard may be empty on this rank: take one it holds.
            next(p for p in parameters if p.grad is not None and _local(p.grad).numel()).grad.fill_(math.nan)
        return original_clip(parameters, *args)

    def build_optimizer(*args):
        optimizer = original_build(*args)
        optimizer.register_step_post_hook(lambda *_: updates.append(calls[0]))
        return optimizer

    monkeypatch.setattr(trainer, "clip_grad_norm_", clip)
    monkeypatch.setattr(trainer, "build_optimizer", build_optimizer)
    return updates


def test_a_nonfinite_step_is_skipped_and_counted(dataset, tmp_path, monkeypatch):
    updates = poison_gradients(monkeypatch, {2})
    console = Console(record=True, width=400)
    result = trainer.train(nonfinite_config(dataset, tmp_path, "run.steps=4", "run.log_every=2"), console)
    assert result.steps == 4 and updates == [1, 3, 4]
    assert [r["skipped_steps"] for r in read_metrics(result.run_dir / "metrics.jsonl")] == [1, 0]
    printed = console.export_text()
    assert "step 2: non-finite loss or gradient norm, skipped (1 of at most 3 in a row); samples: pusher__" in printed


def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_good_weights_saved(dataset, tmp_path, monkeypatch):
    updates = poison_gradients(monkeypatch, {2, 3})
    config = nonfinite_config(dataset, tmp_path, "run.steps=6", "optim.max_nonfinite_steps=2", "run.name=stops")
    with pytest.raises(UserError, match=r"^optim.max_nonfinite_steps: 2 steps in a row \(up to step 3\)"):
        trainer.train(config, Console(quiet=True))
    assert updates == [1]
    assert committed_steps(tmp_path / "stops" / "checkpoints") == [3]


def test_weights_made_nonfinite_by_an_update_are_never_checkpointed(dataset, tmp_path, monkeypatch):
    config = nonfinite_config(dataset, tmp_path, "run.steps=6", "optim.max_nonfinite_steps=2", "run.name=nan_weights",
                              "checkpoint.every=1")
    original_build = trainer.build_optimizer

    def build_optimizer(model, optim):
        optimizer = original_build(model, optim)
        # The first update makes every weight NaN; its own step still looked finite.
        optimizer.register_step_post_hook(lambda *_: [p.data.fill_(math.nan) for p in model.parameters()])
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build_optimizer)
    with pytest.raises(UserError, match=r"2 steps in a row \(up to step 3\).*good weights are in no checkpoint$"):
        trainer.train(config, Console(quiet=True))
    assert committed_steps(tmp_path / "nan_weights" / "checkpoints") == []
