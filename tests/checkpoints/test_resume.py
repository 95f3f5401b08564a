"""Interrupted and resumed training equals uninterrupted training (single process: bit-exact)."""

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lbva.checkpoints_tools.manager import committed_steps
from lbva.errors import UserError
from lbva.training.metrics import read_metrics
from lbva.training.trainer import train

from helpers import prepared_demo, tiny_train_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=4, frames_per_episode=41, image_size=64, seed=1)


def _config(dataset, out, *overrides):
    return tiny_train_config(dataset, out, *overrides)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def test_three_steps_resume_three_steps_equals_six_straight(dataset, tmp_path):
    straight = train(_config(dataset, tmp_path, "run.name=straight", "run.steps=6"), Console(quiet=True))
    stopped = train(_config(dataset, tmp_path, "run.name=split", "run.steps=6"), Console(quiet=True),
                    stop=lambda step: step == 3)
    assert stopped.steps == 3
    resumed = train(
        _config(dataset, tmp_path, "run.name=split", "run.steps=6", "checkpoint.resume=auto"), Console(quiet=True)
    )
    assert _losses(resumed.run_dir) == _losses(straight.run_dir)
    seen = lambda run: {r["step"]: r["tokens_seen"] for r in read_metrics(run.run_dir / "metrics.jsonl")}  # noqa: E731
    assert seen(resumed) == seen(straight)  # the count carries over the resume
    assert list(seen(straight).values()) == sorted(set(seen(straight).values()))
    a, b = load_file(straight.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert committed_steps(resumed.run_dir / "checkpoints") == [3, 6]


def test_periodic_checkpoints_follow_the_retention_policy(dataset, tmp_path):
    run = train(
        _config(dataset, tmp_path, "run.steps=6", "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.keep_every=3"),
        Console(quiet=True),
    )
    assert committed_steps(run.run_dir / "checkpoints") == [3, 5, 6]


def test_resume_refuses_a_checkpoint_of_another_model(dataset, tmp_path):
    train(_config(dataset, tmp_path, "run.name=r", "run.steps=1"), Console(quiet=True))
    with pytest.raises(UserError, match="another model"):
        train(_config(dataset, tmp_path, "run.name=r", "run.steps=2", "model.preset=tiny-shared",
                      "checkpoint.resume=auto"), Console(quiet=True))


def test_resume_refuses_a_damaged_checkpoint(dataset, tmp_path):
    run = train(_config(dataset, tmp_path, "run.name=d", "run.steps=1"), Console(quiet=True))
    folder = run.run_dir / "checkpoints" / "step_00000001"
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged"):
        train(_config(dataset, tmp_path, "run.name=d", "run.steps=2", "checkpoint.resume=auto"), Console(quiet=True))


def test_a_run_extended_on_resume_follows_the_new_schedule(dataset, tmp_path):
    train(_config(dataset, tmp_path, "run.name=ext", "run.steps=2"), Console(quiet=True))
    run = train(_config(dataset, tmp_path, "run.name=ext", "run.steps=8", "checkpoint.resume=auto",
                        "optim.warmup_steps=0", "optim.min_lr_ratio=0.5"), Console(quiet=True))
    lrs = {r["step"]: r["lr"] for r in read_metrics(run.run_dir / "metrics.jsonl") if r["step"] > 2}
    assert lrs[8] == pytest.approx(0.5 * 1e-4) and lrs[3] > lrs[8]
