"""slurm/prepare_data.sbatch: an array job splits a dataset's episodes over its tasks."""

import pytest

from local_slurm import REPO

pytestmark = pytest.mark.slow


def index_lines(prepared) -> int:
    return sum(len(path.read_text().splitlines()) for path in (prepared / "index").rglob("*.jsonl"))


def test_an_array_of_two_tasks_prepares_what_one_process_prepares(slurm_cluster, tiny_config):
    root = tiny_config.parent  # holds lerobot/ and prepared/ (one process) from the fixture
    job_id = slurm_cluster.sbatch(
        "--array=0-1", "--cpus-per-task=1", "--gpus-per-node=1", "--time=10", f"--output={root}/prepare-%A_%a.out",
        str(REPO / "slurm" / "prepare_data.sbatch"), str(root / "lerobot"), str(root / "by-array"),
        "--action-channels=0,1", "--height=64", "--width=64", "--encoders=standin", "--standin-text-dim=32",
    )
    for task in ("0", "1"):
        assert slurm_cluster.wait_until_ended(f"{job_id}_{task}")["JobState"] == "COMPLETED"
    shards = sorted(path.name for path in (root / "by-array" / "shards").rglob("*.tar"))
    assert [name[:4] for name in shards] == ["t000", "t001"]  # one share per task
    assert index_lines(root / "by-array") == index_lines(root / "prepared") > 0
