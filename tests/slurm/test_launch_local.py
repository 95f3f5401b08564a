"""`lbva launch local`: torchrun --standalone on this machine, no Slurm."""

import signal
import subprocess
import sys

import pytest

from lbva.checkpoints_tools.manager import committed_steps

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
