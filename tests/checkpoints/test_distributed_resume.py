"""Multi-process runs under torchrun (gloo): a checkpoint resumes on another layout, and a run whose
worker is killed restarts from its newest checkpoint and finishes with nothing lost or repeated."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbva.checkpoints_tools.manager import committed_steps
from lbva.models.encoders import EncoderChoice
from lbva.training.data.demo_world import generate_demo_dataset
from lbva.training.data.prepare import PrepareConfig, prepare
from lbva.training.metrics import read_metrics
from lbva.training.ledger import read_ledger

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    lerobot = generate_demo_dataset(root / "lerobot", num_episodes=6, frames_per_episode=49, image_size=64, seed=3)
    prepare(PrepareConfig(src=lerobot, out=root / "prepared", action_channels=[0, 1], heights=[64], widths=[64],
                          encoders=EncoderChoice("standin", standin_text_dim=32)))
    return root / "prepared"


def _overrides(prepared, out, name, steps, *extra):
    # Constant lr: a first leg with fewer steps then follows the same schedule as the straight run.
    return [
        "model.preset=tiny-mot", f"data.prepared=['{prepared}']", f"run.output_dir={out}", f"run.name={name}",
        f"run.steps={steps}", "run.log_every=1", "data.text_tokens=8", "data.window_frames=8",
        "data.token_budget=512", "data.pad_multiple=32", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
        "checkpoint.every=1", *extra,
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc, overrides, *launcher_args, wait=True):
    command = [*TORCHRUN, "--nnodes", "1", "--nproc-per-node", str(nproc), *launcher_args,
               "-m", "lbva.launchers.cli", "train", *overrides]
    if "--rdzv-endpoint" not in launcher_args:
        command[3:3] = ["--standalone"]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def saved_at_dp2_tp2(prepared, tmp_path_factory):
    """A 4-step run and a 2-step run of the same schedule, both at dp 2 x tp 2 (shared by the layouts
    that resume the 2-step run: each resumes a copy)."""
    out = tmp_path_factory.mktemp("dp2_tp2")
    saved_layout = ["parallel.dp_shard=2", "parallel.tp=2"]
    _torchrun(4, _overrides(prepared, out, "straight", 4, *saved_layout))
    _torchrun(4, _overrides(prepared, out, "split", 2, *saved_layout))
    return out


@pytest.mark.parametrize("resumed_layout", [
    # Two pipeline stages, one data-parallel rank training both of the step's sequences as microbatches.
    ("2", ["parallel.pp=2", "parallel.dp_shard=1", "parallel.microbatches=2"]),
    ("2", ["parallel.dp_shard=2"]),
    ("4", ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.cp=2"]),
])
def test_a_checkpoint_saved_at_dp2_tp2_resumes_on_another_layout(prepared, saved_at_dp2_tp2, tmp_path,
                                                                  resumed_layout):
    shutil.copytree(saved_at_dp2_tp2 / "split", tmp_path / "split")
    nproc, layout = resumed_layout
    _torchrun(int(nproc), _overrides(prepared, tmp_path, "split", 4, *layout, "checkpoint.resume=auto"))
    straight, resumed = _losses(saved_at_dp2_tp2 / "straight"), _losses(tmp_path / "split")
    assert min(resumed) == 1 and max(resumed) == 4  # the copy kept the first leg's records
    for step in (3, 4):
        assert abs(resumed[step] - straight[step]) <= 1e-5 * abs(straight[step]), (step, resumed, straight)


def _worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_a_killed_worker_restarts_the_group_from_the_newest_checkpoint(prepared, tmp_path):
    steps = 12
    _torchrun(2, _overrides(prepared, tmp_path, "straight", steps, "parallel.dp_shard=2"))
    port = _free_port()
    elastic = ["--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "elastic-test"]
    run_dir = tmp_path / "elastic"
    launcher = _torchrun(2, _overrides(prepared, tmp_path, "elastic", steps, "parallel.dp_shard=2",
                                       "checkpoint.resume=auto"), *elastic, wait=False)
    deadline = time.time() + 300
    while not committed_steps(run_dir / "checkpoints") or max(committed_steps(run_dir / "checkpoints")) < 3:
        assert time.time() < deadline and launcher.poll() is None, "no checkpoint before the deadline"
        time.sleep(0.2)
    killed_at = max(committed_steps(run_dir / "checkpoints"))
    os.kill(_worker_pids(launcher.pid)[0], signal.SIGKILL)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-4000:]
    assert killed_at < steps and "resumed from" in output
    # Ledger: after the restart every (dp rank, step) names exactly the windows of the straight run.
    assert read_ledger(run_dir) == read_ledger(tmp_path / "straight")
    assert _losses(run_dir)[steps] == _losses(tmp_path / "straight")[steps]


def test_the_ema_of_a_two_process_fsdp_run_resumes_on_one_process(prepared, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from lbva.checkpoints_tools.export import load_model
    from lbva.checkpoints_tools.manager import read_meta, step_dir

    decay = 0.5
    _torchrun(2, _overrides(prepared, tmp_path, "ema", 2, "parallel.dp_shard=2", f"optim.ema_decay={decay}"))
    _torchrun(1, _overrides(prepared, tmp_path, "ema", 3, "parallel.dp_shard=1", f"optim.ema_decay={decay}",
                            "checkpoint.resume=auto"))
    root = tmp_path / "ema" / "checkpoints"
    assert read_meta(step_dir(root, 2))["world_size"] == 2 and read_meta(step_dir(root, 3))["world_size"] == 1

    def saved_ema(step):
        params = dict(load_model(step_dir(root, step)).named_parameters())
        saved = {"train": {"ema": {"weights": {name: torch.empty_like(p) for name, p in params.items()}}}}
        dcp.load(saved, checkpoint_id=str(step_dir(root, step)))
        return saved["train"]["ema"]["weights"]

    # Step 3's average is step 2's (saved as two shards, loaded whole) moved towards step 3's weights.
    before, after = saved_ema(2), saved_ema(3)
    weights = dict(load_model(step_dir(root, 3)).named_parameters())
    for name, average in after.items():
        torch.testing.assert_close(average, torch.lerp(before[name], weights[name].detach(), 1 - decay),
                                   rtol=0, atol=1e-7)
    assert any(not torch.equal(before[name], after[name]) for name in after)
