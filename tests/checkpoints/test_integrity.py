"""Checkpoint integrity: what resume, export and `lbva ckpt` do with damaged checkpoints (flipped
bytes of the same size, a damaged lbva_meta.json, a missing DCP .metadata), and what retention
keeps. Damaged inputs are refused with one line and left as they were; `checkpoint.resume=auto`
falls back to the newest sound checkpoint and says so."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from lbva.checkpoints_tools import manager as manager_module
from lbva.checkpoints_tools.export import export_post_training, load_model, write_weights_checkpoint
from lbva.checkpoints_tools.manager import (
    META_FILE, CheckpointManager, RetentionPolicy, committed_steps, read_meta, step_dir, verify,
)
from lbva.errors import UserError
from lbva.launchers.cli import main
from lbva.training.ledger import read_ledger
from lbva.training.metrics import read_metrics
from lbva.training.resume import resolve_resume
from lbva.training.trainer import train

from helpers import prepared_demo, tiny_train_config

STEPS = 4  # checkpoints at 2 and 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run with checkpoints 2 and 4 (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("integrity")
    dataset = prepared_demo(root / "data", num_episodes=4, frames_per_episode=41, image_size=64, seed=1)
    run = train(tiny_train_config(dataset, root / "runs", "run.name=run", f"run.steps={STEPS}",
                                  "checkpoint.every=2"), Console(quiet=True))
    return dataset, run.run_dir


def _copy_run(trained, tmp_path):
    dataset, run_dir = trained
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    return dataset, copy


def _flip_a_byte(folder, name=None):
    """Same-size damage: one byte of a shard file inverted."""
    shard = folder / name if name else sorted(p for p in folder.iterdir() if p.suffix == ".distcp")[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def _tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def _cli(capsys, *argv):
    """`lbva ARGV` in this process -> (exit status, stdout, stderr lines); a traceback fails the test."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def _save(root, steps, retention=None):
    manager = CheckpointManager(root, retention or RetentionPolicy(keep_last=10), async_save=False)
    for step in steps:
        manager.save(step, {"w": torch.full((32, 32), float(step))}, {})
    return manager


META_DAMAGE = {
    "empty": lambda text: "",
    "cut": lambda text: text[: len(text) // 2],
    "without files": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "files"}),
}


# --- resume -------------------------------------------------------------------------------------

def test_resume_auto_falls_back_past_flipped_bytes_and_replays_the_same_samples(trained, tmp_path):
    dataset, run_dir = _copy_run(trained, tmp_path)
    straight = trained[1]
    _flip_a_byte(step_dir(run_dir / "checkpoints", 4))
    log = Console(file=io.StringIO(), width=400)
    train(tiny_train_config(dataset, tmp_path / "runs", "run.name=run", f"run.steps={STEPS}", "checkpoint.every=2",
                            "checkpoint.resume=auto"), log)
    text = log.file.getvalue()
    assert "step_00000004 is damaged" in text and "checksum differs" in text
    assert "falling back to the newest sound checkpoint" in text and "resumed from" in text
    assert f"{step_dir(run_dir / 'checkpoints', 2)} at step 2" in text
    # Steps 3 and 4 ran again (twice in the ledger file) on the very windows of the straight run.
    assert read_ledger(run_dir) == read_ledger(straight)
    assert sum('"step": 3' in line for line in (run_dir / "ledger" / "dp0.jsonl").read_text().splitlines()) == 2
    assert {s: _losses(run_dir)[s] for s in (3, 4)} == {s: _losses(straight)[s] for s in (3, 4)}
    # The damaged checkpoint is set aside, not deleted, and step 4 is written anew and sound.
    assert (run_dir / "checkpoints" / "step_00000004.damaged").is_dir()
    assert committed_steps(run_dir / "checkpoints") == [2, 4] and verify(step_dir(run_dir / "checkpoints", 4)) == []


def test_resume_of_a_named_checkpoint_with_flipped_bytes_is_refused_and_left_as_it_was(trained, tmp_path):
    dataset, run_dir = _copy_run(trained, tmp_path)
    folder = step_dir(run_dir / "checkpoints", 4)
    shard = _flip_a_byte(folder)
    before = _tree_digest(run_dir / "checkpoints")
    config = tiny_train_config(dataset, tmp_path / "runs", "run.name=run", f"checkpoint.resume={folder}")
    with pytest.raises(UserError, match=f"{shard.name}: checksum differs"):
        resolve_resume(config, run_dir, CheckpointManager(run_dir / "checkpoints", RetentionPolicy(), False),
                       Console(quiet=True))
    assert _tree_digest(run_dir / "checkpoints") == before


def test_lbva_train_from_a_named_checkpoint_with_flipped_bytes_ends_with_one_line(trained, tmp_path):
    dataset, run_dir = _copy_run(trained, tmp_path)
    folder = step_dir(run_dir / "checkpoints", 4)
    shard = _flip_a_byte(folder)
    before = _tree_digest(folder)
    result = subprocess.run(
        [sys.executable, "-m", "lbva.launchers.cli", "train", "model.preset=tiny-mot", f"data.prepared=['{dataset}']",
         f"run.output_dir={tmp_path / 'runs'}", "run.name=fresh", "run.steps=6", "data.text_tokens=8",
         "data.window_frames=4", "data.token_budget=256", "data.pad_multiple=32", f"checkpoint.resume={folder}"],
        capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert f"{folder} is damaged: {shard.name}: checksum differs" in lines[0]
    assert _tree_digest(folder) == before and committed_steps(tmp_path / "runs" / "fresh" / "checkpoints") == []


def test_lbva_train_of_a_finished_run_whose_last_checkpoint_is_cut_trains_it_again_from_the_previous(trained, tmp_path):
    """`lbva train` skips a run already at its last step only when that checkpoint looks sound; a
    cut shard sends it through resume=auto, which falls back to step 2 and trains steps 3-4 again."""
    dataset, run_dir = _copy_run(trained, tmp_path)
    last = step_dir(run_dir / "checkpoints", STEPS)
    shard = sorted(p for p in last.iterdir() if p.suffix == ".distcp")[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    result = subprocess.run(
        [sys.executable, "-m", "lbva.launchers.cli", "train", "model.preset=tiny-mot", f"data.prepared=['{dataset}']",
         f"run.output_dir={tmp_path / 'runs'}", f"run.name={run_dir.name}", f"run.steps={STEPS}", "data.text_tokens=8",
         "data.window_frames=4", "data.token_budget=256", "data.pad_multiple=32", "checkpoint.every=2",
         "optim.warmup_steps=2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "nothing to train" not in result.stdout
    assert "falling back" in result.stdout
    assert committed_steps(run_dir / "checkpoints") == [2, 4] and not verify(last)


def test_resume_auto_refuses_when_every_checkpoint_is_damaged_and_changes_nothing(trained, tmp_path):
    dataset, run_dir = _copy_run(trained, tmp_path)
    for step in (2, 4):
        _flip_a_byte(step_dir(run_dir / "checkpoints", step))
    before = _tree_digest(run_dir / "checkpoints")
    config = tiny_train_config(dataset, tmp_path / "runs", "run.name=run", "checkpoint.resume=auto")
    with pytest.raises(UserError, match="every checkpoint under .* is damaged") as error:
        resolve_resume(config, run_dir, CheckpointManager(run_dir / "checkpoints", RetentionPolicy(), False),
                       Console(quiet=True))
    assert "\n" not in str(error.value)
    assert _tree_digest(run_dir / "checkpoints") == before


@pytest.mark.parametrize("damage", META_DAMAGE)
def test_resume_auto_falls_back_past_a_damaged_meta_file(tmp_path, damage):
    root = tmp_path / "run" / "checkpoints"
    manager = _save(root, (2, 4, 6))
    meta = step_dir(root, 6) / META_FILE
    meta.write_text(META_DAMAGE[damage](meta.read_text()))
    log = Console(file=io.StringIO(), width=400)
    config = tiny_train_config(tmp_path, tmp_path, "checkpoint.resume=auto")
    assert resolve_resume(config, tmp_path / "run", manager, log) == step_dir(root, 4)
    assert f"{meta}: damaged" in log.file.getvalue()
    assert committed_steps(root) == [2, 4] and (root / "step_00000006.damaged" / META_FILE).is_file()


@pytest.mark.parametrize("damage", META_DAMAGE)
def test_resume_of_a_named_checkpoint_with_a_damaged_meta_file_is_one_line(tmp_path, damage):
    manager = _save(tmp_path, (1,))
    meta = step_dir(tmp_path, 1) / META_FILE
    meta.write_text(META_DAMAGE[damage](meta.read_text()))
    config = tiny_train_config(tmp_path, tmp_path, f"checkpoint.resume={step_dir(tmp_path, 1)}")
    before = _tree_digest(tmp_path)
    with pytest.raises(UserError, match=f"{meta}: damaged") as error:
        resolve_resume(config, tmp_path, manager, Console(quiet=True))
    assert "\n" not in str(error.value)
    assert _tree_digest(tmp_path) == before


# --- lbva ckpt verify / inspect -----------------------------------------------------------------

@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("damage", META_DAMAGE)
def test_ckpt_commands_name_a_damaged_meta_file_in_one_line(tmp_path, capsys, command, damage):
    _save(tmp_path, (1,))
    meta = step_dir(tmp_path, 1) / META_FILE
    meta.write_text(META_DAMAGE[damage](meta.read_text()))
    status, _, err = _cli(capsys, "ckpt", command, str(step_dir(tmp_path, 1)))
    assert status == 2 and len(err) == 1 and f"{meta}: damaged" in err[0]


@pytest.mark.parametrize("damage, said", [("missing", "missing"), ("garbage", "damaged")])
def test_ckpt_inspect_with_missing_or_damaged_dcp_metadata_is_one_line(tmp_path, capsys, damage, said):
    _save(tmp_path, (1,))
    metadata = step_dir(tmp_path, 1) / ".metadata"
    if damage == "missing":
        metadata.unlink()
    else:
        metadata.write_bytes(b"\x80\x04 not a pickle")
    status, _, err = _cli(capsys, "ckpt", "inspect", str(step_dir(tmp_path, 1)))
    assert status == 2 and len(err) == 1 and ".metadata" in err[0] and said in err[0]


# --- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["post-training", "inference"])
def test_export_refuses_flipped_bytes_and_writes_nothing(trained, tmp_path, capsys, kind):
    _, run_dir = _copy_run(trained, tmp_path)
    shard = _flip_a_byte(step_dir(run_dir / "checkpoints", 4))
    status, _, err = _cli(capsys, "export", kind, str(step_dir(run_dir / "checkpoints", 4)), str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and f"{shard.name}: checksum differs" in err[0]
    assert not (tmp_path / "out").exists()


def test_eval_of_a_checkpoint_with_flipped_bytes_is_one_line(trained, tmp_path, capsys):
    dataset, run_dir = _copy_run(trained, tmp_path)
    shard = _flip_a_byte(step_dir(run_dir / "checkpoints", 4))
    status, _, err = _cli(capsys, "eval", str(run_dir), "--data", str(dataset), "--out", str(tmp_path / "eval"))
    assert status == 2 and len(err) == 1 and f"{shard.name}: checksum differs" in err[0]
    assert not (tmp_path / "eval").exists()


def test_export_refuses_non_finite_weights_and_writes_nothing(trained, tmp_path, capsys):
    _, run_dir = _copy_run(trained, tmp_path)
    model = load_model(step_dir(run_dir / "checkpoints", 4))
    name, parameter = next(iter(model.named_parameters()))
    with torch.no_grad():
        parameter[0] = float("nan")
    folder = write_weights_checkpoint(model, tmp_path / "nan", "tiny-mot", "test")
    status, _, err = _cli(capsys, "export", "post-training", str(folder), str(tmp_path / "out"))
    assert status == 2 and len(err) == 1 and "NaN or inf" in err[0] and name in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(manager_module.CheckpointError, match="NaN"):
        export_post_training(folder, tmp_path / "out")


# --- commit and retention -----------------------------------------------------------------------

def test_the_meta_file_is_on_disk_before_the_commit_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(manager_module.os, "fsync",
                        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd)))
    monkeypatch.setattr(manager_module.os, "replace",
                        lambda src, dst: (events.append(("replace", str(src))), replace(src, dst)))
    _save(tmp_path, (1,))
    partial = f"{step_dir(tmp_path, 1)}.partial"
    rename = events.index(("replace", partial))
    assert ("fsync", f"{partial}/{META_FILE}") in events[:rename] and ("fsync", partial) in events[:rename]
    assert read_meta(step_dir(tmp_path, 1))["step"] == 1


def test_retention_keeps_the_checkpoint_just_written_below_higher_steps(tmp_path):
    # A run resumed from step 2 of a history that went on to 4 and 6: its new step 3 outranks
    # nothing under keep_last=1, yet it is the newest sound state of this history.
    _save(tmp_path, (2, 4, 6))
    _save(tmp_path, (3,), RetentionPolicy(keep_last=1))
    assert committed_steps(tmp_path) == [3, 6]


def test_retention_counts_no_set_aside_checkpoint(tmp_path):
    manager = _save(tmp_path, (2, 4), RetentionPolicy(keep_last=2))
    _flip_a_byte(step_dir(tmp_path, 4))
    folder, damaged = manager.newest_sound(tmp_path)
    assert folder == step_dir(tmp_path, 2) and list(damaged) == [step_dir(tmp_path, 4)]
    (moved,) = manager.set_aside(list(damaged))
    manager.save(3, {"w": torch.zeros(32, 32)}, {})
    manager.save(4, {"w": torch.zeros(32, 32)}, {})
    assert committed_steps(tmp_path) == [3, 4] and moved.is_dir() and moved.name == "step_00000004.damaged"
