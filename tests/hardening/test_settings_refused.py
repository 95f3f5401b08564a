"""Nonsense settings are refused at load with the key named, in one line and exit status 2: numbers
out of range or not finite, run names that are empty or lead out of run.output_dir, run folders
that cannot be created, `--nproc 0`, and layouts the model or the token budget cannot take, which
`lbva launch local` finds before torchrun starts a worker."""

import os

import pytest

from lbva.errors import UserError
from lbva.launchers import cli
from lbva.training.config import TrainConfig
from lbva.training.config_io import load_config

REFUSED = {
    "optim.lr=inf": "optim.lr",
    "optim.lr=nan": "optim.lr",
    "optim.lr=0": "optim.lr",
    "optim.grad_clip=nan": "optim.grad_clip",
    "optim.weight_decay=-0.1": "optim.weight_decay",
    "optim.betas=[2.0, 0.95]": r"optim.betas\[0\]",
    "optim.betas=[0.9, 1.0]": r"optim.betas\[1\]",
    "optim.eps=-1": "optim.eps",
    "optim.eps=0": "optim.eps",
    "optim.min_lr_ratio=nan": "optim.min_lr_ratio",
    "optim.ema_decay=nan": "optim.ema_decay",
    "objective.video_shift=nan": "objective.video_shift",
    "objective.action_shift=inf": "objective.action_shift",
    "objective.action_weight=inf": "objective.action_weight",
    "objective.forward_dynamics_weight=nan": "objective.forward_dynamics_weight",
    "objective.text_dropout=nan": "objective.text_dropout",
    "objective.attention_window=[5, 4]": "objective.attention_window",
    "objective.chunk_size=[0, 2]": "objective.chunk_size",
    "data.validation_fraction=nan": "data.validation_fraction",
    "data.max_skipped_fraction=1.5": "data.max_skipped_fraction",
    "data.max_skipped_fraction=nan": "data.max_skipped_fraction",
    "data.source_weights=['pusher=inf']": "data.source_weights",
    "data.source_weights=['pusher=nan']": "data.source_weights",
    f"run.seed={2**64}": "run.seed",
    "run.seed=-1": "run.seed",
    "run.name=''": "run.name",
    "run.name='  '": "run.name",
    "run.name=../..": "run.name",
    "run.name=..": "run.name",
    "run.name=a/b": "run.name",
}


@pytest.mark.parametrize("override", list(REFUSED))
def test_a_setting_out_of_range_or_not_finite_is_refused_naming_its_key(override):
    with pytest.raises(UserError, match="^" + REFUSED[override]):
        load_config(TrainConfig, overrides=[override])


def test_settings_at_their_bounds_load():
    config = load_config(TrainConfig, overrides=[
        "optim.betas=[0.0, 0.999]", "optim.weight_decay=0", "objective.attention_window=[0, 0]",
        "objective.action_weight=0", "data.max_skipped_fraction=1", "run.seed=9223372036854775807",
        "run.name=my-run.v2",
    ])
    assert config.optim.betas == (0.0, 0.999) and config.run.name == "my-run.v2"


def _run(capsys, *argv) -> tuple[int, str]:
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


@pytest.fixture
def no_torchrun(monkeypatch):
    """Fail the test if `lbva launch local` got as far as starting torchrun."""
    def execv(*_):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(os, "execv", execv)


@pytest.fixture
def prepared(tmp_path):
    """A folder that passes the cheap data check (a card.json), enough for the launch checks."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "card.json").write_text("{}")
    return folder


def test_lbva_train_refuses_an_infinite_lr_in_one_line(capsys):
    status, err = _run(capsys, "train", "optim.lr=inf")
    assert status == 2 and err.count("\n") == 1 and err.startswith("lbva: error: optim.lr must be a finite number")


def test_launch_local_refuses_zero_processes(capsys, no_torchrun, prepared):
    status, err = _run(capsys, "launch", "local", "--nproc", "0", f"data.prepared=['{prepared}']")
    assert status == 2 and err.strip() == "lbva: error: --nproc must be >= 1, got 0"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.preset=tiny-mot", "parallel.tp=3", "parallel.dp_shard=1"], "does not divide num_heads (4)"),
    (["model.preset=tiny-mot", "parallel.cp=2", "parallel.dp_shard=1", "data.token_budget=255"],
     "cp (2) does not divide the token budget (255)"),
    (["model.preset=tiny-mot", "parallel.cp=3", "parallel.dp_shard=1"], "does not divide num_heads (4)"),
], ids=["tp3", "cp2_odd_budget", "cp3"])
def test_launch_local_refuses_a_layout_before_any_worker_starts(capsys, no_torchrun, prepared, tmp_path, overrides,
                                                                expected):
    nproc = overrides[1].split("=")[1]
    status, err = _run(capsys, "launch", "local", "--nproc", nproc, f"data.prepared=['{prepared}']",
                       f"run.output_dir={tmp_path / 'runs'}", *overrides)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"lbva: error: {nproc} rank(s) on this machine: parallel:") and expected in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("obstacle", ["output_dir_is_a_file", "file_above_output_dir"])
def test_a_run_folder_that_cannot_be_created_is_one_line_naming_it(capsys, no_torchrun, prepared, tmp_path, obstacle):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    output_dir = blocker if obstacle == "output_dir_is_a_file" else blocker / "runs"
    status, err = _run(capsys, "launch", "local", "--nproc", "1", f"data.prepared=['{prepared}']",
                       f"run.output_dir={output_dir}", "model.preset=tiny-mot", "run.name=r")
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"lbva: error: run.output_dir: {output_dir / 'r'} cannot be a folder")
    assert blocker.read_text() == "a file, not a folder"


def test_a_read_only_output_dir_is_one_line_naming_it(tmp_path, monkeypatch):
    config = load_config(TrainConfig, overrides=[f"run.output_dir={tmp_path / 'ro'}", "run.name=r"])

    def mkdir(*_, **__):  # the tests run as root, to whom chmod does not deny writing
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir)
    with pytest.raises(UserError, match=r"^run.output_dir: cannot create .*ro/r: Read-only file system$"):
        config.run.make_dir()


def test_an_existing_run_folder_that_is_not_writable_is_one_line_naming_it(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    config = load_config(TrainConfig, overrides=[f"run.output_dir={tmp_path}", "run.name=r"])
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as on a read-only mount (root passes chmod)
    with pytest.raises(UserError, match=rf"^run.output_dir: {tmp_path / 'r'} is not writable$"):
        config.run.make_dir()
