"""A newcomer's own LeRobot dataset through the command line alone, as the README's "Your own LeRobot
dataset" section runs it: describe -> tiny-encoders -> prepare with a split -> train -> eval, on a
dataset with 64x96 px cameras, 15 fps and named 4-d actions (outside_dataset.py), 33 frames an
episode (9 latent frames: the two chunks of 4 that eval's rollouts need). The commands are
the README's (a shell splits them as shlex does), with MY_DATASET filled in."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from outside_dataset import write_outside_dataset

REPO = Path(__file__).resolve().parents[2]
ACTION_MAP = "ee_x=left_x,ee_y=left_y,ee_z=left_z,gripper=left_gripper"
README_COMMANDS = [
    "lbva data describe MY_DATASET",
    "lbva data tiny-encoders runs/encoders --vocab-from MY_DATASET",
    f"lbva data prepare MY_DATASET runs/mine-prepared --action-map {ACTION_MAP} --split val=0.34 "
    "--encoders real --vae runs/encoders/vae --text-encoder runs/encoders/text_encoder",
    "lbva train --config configs/demo.toml 'data.prepared=[\"runs/mine-prepared\"]' data.validation_fraction=0.34 "
    "run.name=mine parallel.dp_replicate=1 run.steps=2",
    "lbva eval runs/mine --data runs/mine-prepared",
]


def lbva(command: str, cwd: Path, dataset: Path) -> subprocess.CompletedProcess:
    """Run one README command (`lbva ...`) in `cwd`, where configs/ links to the repository's."""
    argv = [dataset.name if word == "MY_DATASET" else word for word in shlex.split(command)[1:]]
    result = subprocess.run([sys.executable, "-m", "lbva.launchers.cli", *argv], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Every README command run once, in order: their results by the command's second word."""
    cwd = tmp_path_factory.mktemp("newcomer")
    (cwd / "configs").symlink_to(REPO / "configs")
    dataset = write_outside_dataset(cwd / "my-robot", length=33)
    return cwd, {command.split()[2] if command.startswith("lbva data") else command.split()[1]:
                 lbva(command, cwd, dataset) for command in README_COMMANDS}


def test_describe_shows_the_cameras_actions_and_the_action_map_prepare_then_uses(session):
    out = session[1]["describe"].stdout
    assert "observation.images.front: 96x64 px at 15 fps" in out and "observation.images.wrist: 96x64 px" in out
    assert "actions (4 dims): ee_x, ee_y, ee_z, gripper" in out and "tasks (3):" in out
    assert f"--action-map {ACTION_MAP}" in out and "--height 64 --width 96,96" in out


def test_prepare_follows_the_dataset_and_holds_out_training_s_validation_episodes(session):
    cwd, results = session
    card = json.loads((cwd / "runs" / "mine-prepared" / "card.json").read_text())["sources"]["my-robot"]
    assert card["target_fps"] == 15 and card["tiling"]["camera_sizes"] == [[64, 96], [64, 96]]
    assert card["action_channels"] == [0, 1, 2, 28]
    validation = json.loads((cwd / "runs" / "mine" / "validation_keys.json").read_text())["my-robot"]
    heldout = sorted({int(key.split("__e")[1][:6]) for key in validation})
    assert heldout == card["split"]["heldout_episodes"] and len(heldout) == 2
    assert "lbva eval runs/my-robot --data runs/mine-prepared" in results["prepare"].stdout


def test_a_clean_prepare_and_a_clean_train_say_little_on_stderr(session):
    _, results = session
    for command in ("prepare", "train"):
        lines = results[command].stderr.splitlines()
        assert len(lines) < 5, f"{command}: {lines}"
    assert "unknown" not in results["prepare"].stderr  # tiny-encoders learnt the dataset's words


def test_eval_scores_the_held_out_episodes(session):
    cwd, _ = session
    summary = json.loads((cwd / "runs" / "mine" / "eval" / "summary.json").read_text())
    assert summary["sources"]["my-robot"]["episodes"] == 2
