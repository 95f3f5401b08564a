"""What a newcomer is told: the action-slot table and mapping by name, a one-process train of a
multi-process config, model size overrides, unknown prompt words, and quiet output by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbva.errors import UserError
from lbva.launchers.cli import main
from lbva.training.config import ModelSection
from lbva.training.data.action_slots import channels_from_map, slot_table, suggest_slots

from outside_dataset import ACTION_NAMES, write_outside_dataset

REPO = Path(__file__).resolve().parents[2]


def test_the_docs_hold_the_action_slot_table_the_code_prints():
    assert slot_table() in (REPO / "docs" / "data.md").read_text()


def test_prepare_help_prints_the_action_slot_table(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "| 28 | left_gripper | left gripper |" in capsys.readouterr().out


def test_an_action_map_gives_each_named_dim_its_slot():
    assert channels_from_map("gripper=28,ee_z=left_z,ee_y=1,ee_x=left_x", ACTION_NAMES) == [0, 1, 2, 28]


@pytest.mark.parametrize("text, message", [
    ("ee_x=0,ee_y=1,ee_z=2", "missing: gripper"),
    ("ee_x=0,ee_y=1,ee_z=2,gripper=28,roll=3", "not dims: roll"),
    ("ee_x=0,ee_y=1,ee_z=2,gripper=grip", "'grip' is neither a slot number"),
    ("ee_x=0,ee_y=1,ee_z=2,gripper", "'gripper' is not NAME=SLOT"),
])
def test_a_wrong_action_map_is_one_line_naming_the_problem(text, message):
    with pytest.raises(UserError, match=message):
        channels_from_map(text, ACTION_NAMES)


def test_slots_are_guessed_from_dim_names():
    assert suggest_slots(["ee_x", "right_gripper", "joint_3", "dy", "speed"]) == [
        "left_x", "right_gripper", "left_joint_3", "left_y", None]


def test_a_one_process_train_of_a_two_process_config_says_what_to_run(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = REPO / "configs" / "demo.toml"
    assert main(["train", "--config", str(config), "run.steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"run `lbva launch local --nproc 2 --config {config} run.steps=2`" in err
    assert f"`lbva train --config {config} run.steps=2 parallel.dp_replicate=1`" in err


def test_model_size_overrides_change_the_preset():
    config = ModelSection(preset="tiny-mot", width=384, heads=8, layers=3).model_config()
    assert (config.video_width, config.num_heads, config.head_dim, config.num_layers) == (384, 8, 48, 3)


@pytest.mark.parametrize("overrides, message", [
    (dict(width=128), "model.width=128: video width num_heads x head_dim = 4 x 32 = 128 is narrower than a video "
                      "token"),
    (dict(width=200, heads=3), "the video width 200 must divide into 3 heads"),
    (dict(layers=0), "model.layers must be >= 1"),
])
def test_a_model_size_the_model_cannot_have_is_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        ModelSection(preset="tiny-mot", **overrides).validate()


def lbva(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbva.launchers.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return write_outside_dataset(tmp_path_factory.mktemp("small") / "robot", episodes=2, length=9)


def test_prepare_counts_the_prompt_words_its_tokenizer_does_not_know(small_dataset, tmp_path):
    assert lbva("data", "tiny-encoders", "enc", cwd=tmp_path).returncode == 0  # no --vocab-from: no words
    result = lbva("data", "prepare", str(small_dataset), "out", "--action-channels", "0,1,2,28", "--encoders",
                  "real", "--vae", "enc/vae", "--text-encoder", "enc/text_encoder", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # "pick up the cube" and "open the drawer": 6 distinct words, none known
    assert "robot: 6 prompt words are unknown to the text encoder's tokenizer" in result.stderr
    # that warning and the progress bar: the spawned workers are as quiet as their parent
    assert len(result.stderr.splitlines()) == 2, result.stderr


def test_library_notices_show_with_verbose_only(tmp_path):
    quiet = lbva("data", "tiny-encoders", "quiet", cwd=tmp_path)
    verbose = lbva("data", "tiny-encoders", "loud", "--verbose", cwd=tmp_path)
    assert quiet.returncode == verbose.returncode == 0
    assert quiet.stderr == "" and len(verbose.stderr.splitlines()) > 1
