"""Jobs on a real Slurm cluster (localhost, node1 + node2): sbatch and submitit runs to completion,
the time-limit signal, `scontrol requeue`, a rank killed inside a job (torchrun restarts the group),
and a run continued on fewer nodes.

Every interrupted run must end with exactly the losses of the uninterrupted two-node run: the
tiny run writes no periodic checkpoint, so it can only get there by resuming from the checkpoint
its stop wrote. Two-node jobs run two ranks (one per node, gloo, data-parallel) of the
distributed trainer on prepared shards.
"""

import os
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from lbva.checkpoints_tools.manager import committed_steps
from lbva.training.ledger import read_ledger

from local_slurm import REPO, losses, wait_for_step

pytestmark = pytest.mark.slow
STEPS = 12  # TINY_RUN's run.steps


def run_dir(tiny_config: Path, name: str) -> Path:
    return tiny_config.parent / "runs" / name


def submit_sbatch(cluster, tiny_config: Path, name: str, *overrides: str, nodes: int = 2,
                  script_options: tuple[str, ...] = ()) -> str:
    """slurm/pretrain.sbatch as a user submits it, the GPU count of the test nodes given on the
    command line; --time leaves its USR2 (300 s before the limit) far beyond these runs."""
    return cluster.sbatch(
        f"--nodes={nodes}", "--gpus-per-node=1", "--time=10", f"--output={tiny_config.parent}/%j.out",
        str(REPO / "slurm" / "pretrain.sbatch"), *script_options, f"--config={tiny_config}", f"run.name={name}",
        *overrides,
    )


def sbatch_log(tiny_config: Path, job_id: str) -> str:
    return (tiny_config.parent / f"{job_id}.out").read_text()


def submit_submitit(cluster, tiny_config: Path, name: str, *options: str) -> list[str]:
    out = cluster.run(
        sys.executable, "-m", "lbva.launchers.cli", "launch", "slurm", f"--config={tiny_config}", "--nodes=2",
        "--gpus-per-node=1", "--time=10", "--signal-before=60", *options, f"run.name={name}",
    )
    return re.findall(r"\d+", re.search(r"submitted job ([\d, ]+)", out).group(1))


def submitit_log(tiny_config: Path, name: str, job_id: str) -> str:
    """Every task's log of the job: torchrun's c10d rendezvous hands rank 0 (the one that prints) to
    whichever node's agent it chooses, not to task 0."""
    folder = run_dir(tiny_config, name) / "slurm"
    return "".join(path.read_text() for path in sorted(folder.glob(f"{job_id}_*_log.out")))


def stop_and_resume_steps(log: str) -> tuple[set[int], set[int]]:
    stopped = {int(step) for step in re.findall(r"stopped at step (\d+) of", log)}
    # The trainer's console wraps its lines in a log (no terminal): the path may break anywhere.
    resumed = {int(step) for step in re.findall(r"resumed from.*?at\s+step\s+(\d+)", log, re.S)}
    return stopped, resumed


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_config):
    """The uninterrupted two-node sbatch run: (final job state, losses per step)."""
    job_id = submit_sbatch(slurm_cluster, tiny_config, "reference")
    return slurm_cluster.wait_until_ended(job_id), losses(run_dir(tiny_config, "reference"))


def test_a_two_node_sbatch_job_trains_to_completion(reference, tiny_config):
    job, reference_losses = reference
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2" and job["Restarts"] == "0"
    assert sorted(reference_losses) == list(range(1, STEPS + 1))
    assert committed_steps(run_dir(tiny_config, "reference") / "checkpoints") == [STEPS]


def test_a_two_node_submitit_job_trains_to_completion(slurm_cluster, tiny_config, reference):
    (job_id,) = submit_submitit(slurm_cluster, tiny_config, "submitit")
    job = slurm_cluster.wait_until_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2" and job["Restarts"] == "0"
    assert losses(run_dir(tiny_config, "submitit")) == reference[1]


def test_the_time_limit_signal_checkpoints_requeues_and_resumes_to_the_same_losses(
    slurm_cluster, tiny_config, reference
):
    job_id = submit_sbatch(slurm_cluster, tiny_config, "time-limit")
    wait_for_step(run_dir(tiny_config, "time-limit"), 2)
    # What --signal=B:USR2@300 does 300 s before the limit: USR2 to the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR2", job_id)
    job = slurm_cluster.wait_until_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1"
    stopped, resumed = stop_and_resume_steps(sbatch_log(tiny_config, job_id))
    assert len(stopped) == 1 and stopped == resumed and max(stopped) < STEPS  # all ranks, one step
    assert losses(run_dir(tiny_config, "time-limit")) == reference[1]


def test_the_time_limit_signal_requeues_a_submitit_job_through_submitit(slurm_cluster, tiny_config, reference):
    (job_id,) = submit_submitit(slurm_cluster, tiny_config, "submitit-time-limit")
    wait_for_step(run_dir(tiny_config, "submitit-time-limit"), 2)
    # What submitit's --signal=USR2@60 does 60 s before the limit: USR2 to every task.
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    job = slurm_cluster.wait_until_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1"
    log = submitit_log(tiny_config, "submitit-time-limit", job_id)
    stopped, resumed = stop_and_resume_steps(log)
    assert len(stopped) == 1 and stopped == resumed
    assert f"Requeued job {job_id}" in log  # by submitit's own handler, after the checkpoint
    assert losses(run_dir(tiny_config, "submitit-time-limit")) == reference[1]


def test_a_requeue_by_scontrol_mid_run_resumes_to_the_same_losses(slurm_cluster, tiny_config, reference):
    job_id = submit_sbatch(slurm_cluster, tiny_config, "requeued")
    wait_for_step(run_dir(tiny_config, "requeued"), 2)
    slurm_cluster.run("scontrol", "requeue", job_id)  # what preemption with PreemptMode=REQUEUE does
    job = slurm_cluster.wait_until_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1"
    log = sbatch_log(tiny_config, job_id)
    stopped, resumed = stop_and_resume_steps(log)
    assert len(stopped) == 1 and stopped == resumed and "SIGTERM" in log
    assert losses(run_dir(tiny_config, "requeued")) == reference[1]


def test_a_requeue_mid_run_with_data_loader_workers_resumes_to_the_same_losses(slurm_cluster, tiny_config, reference):
    # Slurm's SIGTERM also reaches the loader workers: they must outlive it until their rank has
    # checkpointed, and end with it (training/data/loader.py).
    job_id = submit_sbatch(slurm_cluster, tiny_config, "requeued-workers", "data.num_workers=2")
    wait_for_step(run_dir(tiny_config, "requeued-workers"), 2)
    slurm_cluster.run("scontrol", "requeue", job_id)
    job = slurm_cluster.wait_until_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1"
    stopped, resumed = stop_and_resume_steps(sbatch_log(tiny_config, job_id))
    assert len(stopped) == 1 and stopped == resumed
    assert losses(run_dir(tiny_config, "requeued-workers")) == reference[1]


def _worker_of(name: str) -> int:
    """The pid of one training worker of run `name` (a child of a torchrun, not the torchrun)."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if f"run.name={name}" in cmdline and "lbva.launchers.cli" in cmdline and not any(
            "torchrun" in part or "torch.distributed.run" in part for part in cmdline
        ):
            return process.info["pid"]
    raise AssertionError(f"no worker of run {name} found")


def wait_for_a_checkpoint(tiny_config: Path, name: str) -> int:
    """The step of run `name`'s first committed checkpoint, once there is one (at most 180 s)."""
    checkpoints = run_dir(tiny_config, name) / "checkpoints"
    deadline = time.monotonic() + 180
    while not committed_steps(checkpoints):
        assert time.monotonic() < deadline, f"{name}: no checkpoint in 180 s"
        time.sleep(0.05)
    return committed_steps(checkpoints)[-1]


def test_a_killed_rank_restarts_the_group_inside_the_job_from_the_newest_checkpoint(
    slurm_cluster, tiny_config, reference
):
    name = "elastic"
    job_id = submit_sbatch(slurm_cluster, tiny_config, name, "checkpoint.every=3",
                           script_options=("--max-restarts", "1"))
    killed_after = wait_for_a_checkpoint(tiny_config, name)
    os.kill(_worker_of(name), signal.SIGKILL)  # one rank of one node dies without a word
    job = slurm_cluster.wait_until_ended(job_id)
    # The same job, never requeued: torchrun restarted both nodes' workers, which resumed.
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0"
    assert killed_after < STEPS
    log = sbatch_log(tiny_config, job_id)
    assert "up to 1 group restarts" in log
    resumed = stop_and_resume_steps(log)[1]
    assert resumed and min(resumed) >= killed_after
    assert losses(run_dir(tiny_config, name)) == reference[1]
    assert read_ledger(run_dir(tiny_config, name)) == read_ledger(run_dir(tiny_config, "reference"))


def test_a_killed_rank_restarts_the_group_inside_a_submitit_job(slurm_cluster, tiny_config, reference):
    name = "submitit-elastic"
    (job_id,) = submit_submitit(slurm_cluster, tiny_config, name, "--max-restarts=1", "checkpoint.every=3")
    killed_after = wait_for_a_checkpoint(tiny_config, name)
    os.kill(_worker_of(name), signal.SIGKILL)
    job = slurm_cluster.wait_until_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0"  # restarted by torchrun, not requeued
    assert killed_after < STEPS
    resumed = stop_and_resume_steps(submitit_log(tiny_config, name, job_id))[1]
    assert resumed and min(resumed) >= killed_after
    assert losses(run_dir(tiny_config, name)) == reference[1]
    assert read_ledger(run_dir(tiny_config, name)) == read_ledger(run_dir(tiny_config, "reference"))


def test_a_run_stopped_on_two_nodes_continues_on_one(slurm_cluster, tiny_config):
    first = submit_sbatch(slurm_cluster, tiny_config, "shrunk")
    wait_for_step(run_dir(tiny_config, "shrunk"), 2)
    slurm_cluster.run("scancel", first)  # SIGTERM: checkpoint and stop; a cancelled job stays gone
    assert slurm_cluster.wait_until_ended(first)["JobState"] == "CANCELLED"
    (stopped_at,) = committed_steps(run_dir(tiny_config, "shrunk") / "checkpoints")
    assert 2 <= stopped_at < STEPS

    second = submit_sbatch(slurm_cluster, tiny_config, "shrunk", nodes=1)
    job = slurm_cluster.wait_until_ended(second)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "1"
    assert stop_and_resume_steps(sbatch_log(tiny_config, second))[1] == {stopped_at}
    assert sorted(losses(run_dir(tiny_config, "shrunk"))) == list(range(1, STEPS + 1))
    assert committed_steps(run_dir(tiny_config, "shrunk") / "checkpoints")[-1] == STEPS


def test_chained_jobs_run_one_after_another_and_the_later_ones_find_the_run_done(slurm_cluster, tiny_config):
    first, second = submit_submitit(slurm_cluster, tiny_config, "chained", "--chain=2")
    assert slurm_cluster.wait_until_ended(second)["JobState"] == "COMPLETED"
    assert slurm_cluster.job(first)["JobState"] == "COMPLETED"
    assert sorted(losses(run_dir(tiny_config, "chained"))) == list(range(1, STEPS + 1))
    assert f"already at step {STEPS} of {STEPS}" in submitit_log(tiny_config, "chained", second)
