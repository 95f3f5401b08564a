"""`lbva launch` options and user errors (no cluster needed)."""

import subprocess
import sys

import pytest

from lbva.launchers.cli import main
from lbva.launchers.slurm import SlurmResources, parse_sbatch_options, parse_time
from lbva.errors import UserError


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("1:30", 2), ("4:00:00", 240), ("1-0", 1440), ("2-12:30", 3630), ("0-0:0:59", 1),
])
def test_slurm_time_formats_become_minutes_rounded_up(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "4h", "1:2:3:4", "0", "-5"])
def test_a_malformed_time_is_a_user_error(text):
    with pytest.raises(UserError, match="--time"):
        parse_time(text)


def test_sbatch_options_become_a_dict():
    assert parse_sbatch_options(["account=abc", "--qos=high"]) == {"account": "abc", "qos": "high"}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_sbatch_options(["exclusive"])


def test_the_signal_must_come_before_the_time_limit():
    with pytest.raises(UserError, match="shorter than --time"):
        SlurmResources(nodes=1, gpus_per_node=0, time_minutes=5, signal_before_s=300).validate()


def test_a_bad_option_ends_in_one_line_with_status_2(capsys):
    assert main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "0", "--time", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--time" in err


def test_a_bad_config_ends_before_torchrun_starts(capsys):
    assert main(["launch", "local", "--nproc", "1", "run.stepz=3"]) == 2
    assert "run.stepz" in capsys.readouterr().err


def test_the_module_runs_the_launch_commands():
    done = subprocess.run([sys.executable, "-m", "lbva.launchers.cli", "train", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--config" in done.stdout


def test_a_layout_that_does_not_fit_the_local_ranks_ends_before_torchrun_starts(capsys, monkeypatch):
    monkeypatch.setattr("lbva.launchers.local.os.execv", lambda *a: pytest.fail("torchrun was started"))
    # tiny-mot has 4 heads: tp 3 cannot split them.
    assert main(["launch", "local", "--nproc", "3", "model.preset=tiny-mot", "parallel.tp=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "3 rank(s) on this machine: parallel: tp (3) x cp (1) = 3 does not divide num_heads (4)" in err


def test_a_layout_that_does_not_fill_the_slurm_allocation_ends_before_sbatch(capsys, monkeypatch):
    monkeypatch.setattr("lbva.launchers.slurm.submitit.AutoExecutor", lambda **_: pytest.fail("submitted"))
    assert main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "2", "--time", "10",
                 "parallel.dp_shard=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("2 node(s) x 2 rank(s) = 4 ranks: parallel: pp (1) x dp_replicate (1) x dp_shard (3) x "
            "cp (1) x tp (1) = 3, but the world size is 4") in err


def test_cpu_slurm_nodes_count_one_rank_each(capsys, monkeypatch):
    monkeypatch.setattr("lbva.launchers.slurm.submitit.AutoExecutor", lambda **_: pytest.fail("submitted"))
    assert main(["launch", "slurm", "--nodes", "3", "--gpus-per-node", "0", "--time", "10", "parallel.tp=2"]) == 2
    assert ("3 node(s) x 1 rank(s) = 3 ranks: parallel: pp (1) x dp_replicate (1) x cp (1) x tp (2) = 2 does not "
            "divide the world size (3)") in capsys.readouterr().err


def test_an_inferred_dp_shard_fills_the_allocation_and_the_data_is_checked_next(capsys, monkeypatch):
    monkeypatch.setattr("lbva.launchers.slurm.submitit.AutoExecutor", lambda **_: pytest.fail("submitted"))
    # dp_shard -1 takes the 8 ranks tp 2 leaves of 16; the next check is the (missing) data.
    assert main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--time", "10", "parallel.tp=2",
                 "parallel.dp_shard=-1"]) == 2
    assert "no data: set data.prepared" in capsys.readouterr().err


def test_launch_local_starts_lbva_train_on_every_rank(tmp_path, monkeypatch):
    (tmp_path / "card.json").write_text("{}")  # a prepared dataset, as far as the launch checks
    started = []
    monkeypatch.setattr("lbva.launchers.local.os.execv", lambda path, argv: started.append(argv))
    monkeypatch.setattr("lbva.launchers.local.signal.signal", lambda *args: None)  # keeps pytest's USR2
    assert main(["launch", "local", "--nproc", "2", "model.preset=tiny-mot", f"data.prepared=['{tmp_path}']"]) == 0
    (command,) = started
    assert command[command.index("--nproc-per-node=2") + 1:] == [
        "-m", "lbva.launchers.cli", "train", "model.preset=tiny-mot", f"data.prepared=['{tmp_path}']"]


@pytest.mark.parametrize("argv, restarts", [([], "3"), (["--max-restarts", "0"], "0"), (["--max-restarts", "7"], "7")])
def test_launch_local_lets_torchrun_restart_the_group(tmp_path, monkeypatch, argv, restarts):
    (tmp_path / "card.json").write_text("{}")
    started = []
    monkeypatch.setattr("lbva.launchers.local.os.execv", lambda path, argv: started.append(argv))
    monkeypatch.setattr("lbva.launchers.local.signal.signal", lambda *args: None)
    assert main(["launch", "local", "--nproc", "2", *argv, "model.preset=tiny-mot",
                 f"data.prepared=['{tmp_path}']"]) == 0
    (command,) = started
    assert f"--max-restarts={restarts}" in command[:command.index("lbva.launchers.cli")]


def test_a_negative_max_restarts_is_a_user_error(capsys):
    assert main(["launch", "local", "--nproc", "1", "--max-restarts", "-1"]) == 2
    assert "--max-restarts must be >= 0" in capsys.readouterr().err
