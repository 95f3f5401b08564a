"""A kill -9 of torchrun's agent stops its workers: Linux sends each the trainer's stop signal
(training/distributed.py die_with_agent), so they checkpoint one agreed step and exit instead of
training on as orphans that write into the run directory."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lbva.checkpoints_tools.manager import committed_steps
from lbva.training.metrics import read_metrics

from helpers import prepared_demo


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=4, frames_per_episode=33, image_size=64, seed=2)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_checkpoint_and_exit_when_their_agent_is_killed(dataset, tmp_path):
    steps = 10_000
    run_dir = tmp_path / "orphan"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lbva.launchers.cli", "train", "model.preset=tiny-mot", f"data.prepared=['{dataset}']",
        f"run.output_dir={tmp_path}", "run.name=orphan", f"run.steps={steps}", "run.log_every=1",
        "run.eval_every=100000", "data.text_tokens=8", "data.window_frames=4", "data.token_budget=256",
        "data.pad_multiple=32", "parallel.dp_shard=2", "checkpoint.every=2", "checkpoint.async_save=false",
    ]
    log = tmp_path / "torchrun.log"
    agent = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while not committed_steps(run_dir / "checkpoints"):
            assert time.time() < deadline and agent.poll() is None, "no checkpoint before the deadline"
            time.sleep(0.2)
        workers = _children(agent.pid)
        assert len(workers) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.time() + 120
        while any(_alive(pid) for pid in workers):
            assert time.time() < deadline, "the workers trained on after their agent died"
            time.sleep(0.2)
    finally:  # the workers by pid: once the agent is gone they are no longer its children
        for pid in [agent.pid, *workers, *_children(agent.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    saved = committed_steps(run_dir / "checkpoints")
    assert saved and max(saved) < steps
    assert not list((run_dir / "checkpoints").glob("*.partial")), "a checkpoint was left half written"
    # The stop was the trainer's own: it said so and checkpointed the last step it trained.
    assert "stopping at step" in log.read_text()
    assert max(saved) == max(record["step"] for record in read_metrics(run_dir / "metrics.jsonl"))
