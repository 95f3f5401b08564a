"""`lbva launch local`: torchrun --standalone on this machine, no Slurm."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lbva.checkpoints_tools.manager import committed_steps
from lbva.training.ledger import read_ledger

from local_slurm import REPO, losses, wait_for_step


@pytest.mark.slow
def test_sigterm_stops_a_local_run_with_a_checkpoint_and_the_same_command_resumes_it(tiny_config):
    run_dir = tiny_config.parent / "runs" / "local"
    command = [sys.executable, "-m", "lbva.launchers.cli", "launch", "local", "--nproc=2", f"--config={tiny_config}",
               "run.name=local"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run_dir, 2)
    first.send_signal(signal.SIGTERM)  # the process is torchrun now: it passes SIGTERM to the workers
    first.wait(timeout=120)
    (stopped_at,) = committed_steps(run_dir / "checkpoints")
    assert 2 <= stopped_at < 12

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    assert sorted(losses(run_dir)) == list(range(1, 13))
    assert committed_steps(run_dir / "checkpoints")[-1] == 12


@pytest.mark.slow
def test_a_killed_worker_of_a_local_run_restarts_the_group_from_its_newest_checkpoint(tiny_config):
    runs = tiny_config.parent / "runs"
    base = [sys.executable, "-m", "lbva.launchers.cli", "launch", "local", "--nproc=2", f"--config={tiny_config}"]
    straight = subprocess.run([*base, "run.name=local-straight"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    launcher = subprocess.Popen([*base, "--max-restarts=1", "run.name=local-elastic", "checkpoint.every=3"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = runs / "local-elastic" / "checkpoints"
    deadline = time.monotonic() + 180
    while not committed_steps(checkpoints):
        assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint in 180 s"
        time.sleep(0.05)
    killed_after = committed_steps(checkpoints)[-1]
    os.kill(psutil.Process(launcher.pid).children()[0].pid, signal.SIGKILL)  # the launcher is torchrun now
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-3000:]
    assert killed_after < 12 and "resumed from" in output
    assert losses(runs / "local-elastic") == losses(runs / "local-straight")
    assert read_ledger(runs / "local-elastic") == read_ledger(runs / "local-straight")


def test_a_user_mistake_only_a_worker_sees_ends_the_launch_in_one_line_without_restarts(tiny_config, tmp_path):
    not_wan = tmp_path / "not-wan"  # exists, so the config validates; the workers fail to import it
    not_wan.mkdir()
    command = [sys.executable, "-m", "lbva.launchers.cli", "launch", "local", "--nproc=2", "--max-restarts=3",
               f"--config={tiny_config}", "run.name=mistake", f"model.init_from_wan={not_wan}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbva: error: model.init_from_wan:"), result.stderr[-3000:]
    assert "ChildFailedError" not in result.stdout + result.stderr
