"""A SIGTERM-ed `lbva launch local` stops after its checkpoint as a clean exit: status 0, the
workers' one line on stdout, nothing on stderr (no traceback of torchrun's agent)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbva.checkpoints_tools.manager import committed_steps
from lbva.models.encoders import EncoderChoice
from lbva.training.data.prepare import PrepareConfig, prepare

from outside_dataset import write_outside_dataset


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if "step" in json.loads(line))


@pytest.mark.slow
def test_sigterm_to_a_local_launch_exits_0_after_its_checkpoint(tmp_path):
    dataset = write_outside_dataset(tmp_path / "robot", episodes=4, length=17)
    prepare(PrepareConfig(src=dataset, out=tmp_path / "prepared", action_channels=[0, 1, 2, 28],
                          encoders=EncoderChoice("standin", standin_text_dim=32)))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lbva.launchers.cli", "launch", "local", "--nproc", "2", "model.preset=tiny-mot",
         f"data.prepared=['{tmp_path / 'prepared'}']", f"run.output_dir={tmp_path / 'runs'}", "run.name=stop",
         "run.steps=200", "run.log_every=1", "data.text_tokens=8", "data.window_frames=4", "data.token_budget=256",
         "data.pad_multiple=32", "data.validation_fraction=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while logged_steps(tmp_path / "runs" / "stop") < 2:
        assert time.monotonic() < deadline and launcher.poll() is None, "no second step in 180 s"
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    (stopped_at,) = committed_steps(tmp_path / "runs" / "stop" / "checkpoints")
    assert launcher.returncode == 0 and err == ""
    assert f"stopped at step {stopped_at} of 200 on SIGTERM" in out
