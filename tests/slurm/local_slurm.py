"""Helpers of the Slurm tests: the client commands against the local test cluster, the tiny run,
and waiting for jobs and steps."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lbva.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path("/tmp/lbva-slurm")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The tiny run every job trains: 12 steps of the tiny MoT, one log line per step, and no periodic
# checkpoint, so that an interrupted run can only resume from the checkpoint its stop wrote.
TINY_RUN = """\
[run]
output_dir = "{runs}"
steps = 12
log_every = 1
device = "cpu"
[model]
preset = "tiny-mot"
[data]
prepared = ["{prepared}"]
text_tokens = 8
window_frames = 8
token_budget = 512
pad_multiple = 32
[optim]
warmup_steps = 2
[checkpoint]
every = 0
"""


@dataclass
class SlurmCluster:
    """Runs Slurm's client commands against the test cluster."""

    conf: Path
    env: dict[str, str]

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def sbatch(self, *arguments: str) -> str:
        """Submit from the repository root, as users do; returns the job id."""
        return self.run("sbatch", "--parsable", *arguments).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return {key: re.search(rf"\b{key}=(\S*)", line).group(1) for key in ("JobState", "Restarts", "NumNodes")}

    def wait_until_ended(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in ENDED:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a step logged again after a resume keeps its last value."""
    return {record["step"]: record["loss"] for record in read_metrics(run_dir / "metrics.jsonl")}


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    """Until the run has logged `step`: the job is then mid-run (TINY_RUN has 12 steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout} s")
