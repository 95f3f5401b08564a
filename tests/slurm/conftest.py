"""A real Slurm cluster on localhost for the launcher tests (slurm/local/start.sh: slurmctld and
two slurmd acting as node1 and node2) and the tiny run its jobs train.

Without the Slurm daemons the cluster tests skip on a developer machine and fail under CI=true
(CI installs them with slurm/local/install.sh first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbva.models.encoders import EncoderChoice
from lbva.training.data.demo_world import generate_demo_dataset
from lbva.training.data.prepare import PrepareConfig, prepare

from local_slurm import DAEMONS, REPO, STATE_DIR, TINY_RUN, SlurmCluster


def _slurm_installed() -> bool:
    return all(shutil.which(tool) or Path("/usr/sbin", tool).exists() for tool in DAEMONS)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if not _slurm_installed():
        message = "Slurm daemons not installed (run slurm/local/install.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must run the Slurm tests")
        pytest.skip(message)
    conf = STATE_DIR / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}:/usr/sbin"}
    already_running = conf.exists() and subprocess.run(
        ["scontrol", "ping"], env=env, capture_output=True).returncode == 0
    subprocess.run(["bash", str(REPO / "slurm/local/start.sh"), str(STATE_DIR)], check=True, env=env)
    yield SlurmCluster(conf, env)
    if not already_running:  # a developer's own cluster stays up
        subprocess.run(["bash", str(REPO / "slurm/local/stop.sh"), str(STATE_DIR)], check=True, env=env)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """The TOML of the tiny run; runs land in `runs/` beside it, one per run.name."""
    root = tmp_path_factory.mktemp("slurm-runs")
    lerobot = generate_demo_dataset(root / "lerobot", num_episodes=6, frames_per_episode=49, image_size=64, seed=3)
    # Stand-in encoders: 32-wide text embeddings, the tiny presets' text_dim.
    prepare(PrepareConfig(src=lerobot, out=root / "prepared", action_channels=[0, 1], heights=[64], widths=[64],
                          encoders=EncoderChoice("standin", standin_text_dim=32)))
    config = root / "tiny.toml"
    config.write_text(TINY_RUN.format(prepared=root / "prepared", runs=root / "runs"))
    return config
