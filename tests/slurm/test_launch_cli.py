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
    assert main(["slurm", "--nodes", "1", "--gpus-per-node", "0", "--time", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--time" in err


def test_a_bad_config_ends_before_torchrun_starts(capsys):
    assert main(["local", "--nproc", "1", "run.stepz=3"]) == 2
    assert "run.stepz" in capsys.readouterr().err


def test_the_module_runs_the_launch_commands():
    done = subprocess.run([sys.executable, "-m", "lbva.launchers.cli", "worker", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--config" in done.stdout
