"""`lbva` turns user mistakes into one line on stderr and exit status 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

LBVA = [sys.executable, "-m", "lbva.launchers.cli"]


def run(*args, cwd=None):
    return subprocess.run([*LBVA, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_model_info_prints_the_released_total():
    result = run("model-info", "lingbot-va-shared")
    assert result.returncode == 0
    assert "5,088,872,670" in result.stdout


def test_model_info_of_an_unknown_preset(tmp_path):
    assert_one_line_error(run("model-info", "lingbot-va-9b"), "lingbot-va-9b", "lingbot-va-shared")


def test_unknown_config_key():
    assert_one_line_error(run("train", "optim.lrr=0.1"), "optim.lrr", "did you mean 'lr'")


def test_wrong_type_in_a_config_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[run]\nsteps = "many"\n')
    assert_one_line_error(run("train", "--config", str(config)), "bad.toml", "run.steps")


def test_missing_config_file(tmp_path):
    assert_one_line_error(run("train", "--config", str(tmp_path / "nope.toml")), "nope.toml")


def test_missing_dataset_path(tmp_path):
    result = run("train", f"data.prepared=['{tmp_path / 'absent'}']", f"run.output_dir={tmp_path / 'runs'}")
    assert_one_line_error(result, "data.prepared", "absent")


def test_preset_that_does_not_exist_in_the_config():
    assert_one_line_error(run("train", "model.preset=giant"), "model.preset", "giant")


def test_unknown_subcommand():
    assert_one_line_error(run("fly"), "fly")


@pytest.mark.parametrize("override", ["objective.chunk_size=[3, 1]", "optim.lr=-1", "run.wandb=sometimes"])
def test_invalid_values_name_the_option(override):
    assert_one_line_error(run("train", override), override.split("=")[0])


def test_ckpt_verify_of_a_folder_that_is_no_checkpoint(tmp_path):
    assert_one_line_error(run("ckpt", "verify", str(tmp_path)), str(tmp_path), "lbva_meta.json")


def test_ckpt_verify_names_a_truncated_shard(tmp_path):
    import torch

    from lbva.checkpoints_tools.manager import CheckpointManager, RetentionPolicy

    CheckpointManager(tmp_path, RetentionPolicy(), async_save=False).save(1, {"w": torch.ones(64, 64)}, {})
    folder = tmp_path / "step_00000001"
    assert run("ckpt", "verify", str(folder)).returncode == 0
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:50])
    assert_one_line_error(run("ckpt", "verify", str(folder)), shard.name, "truncated")


def test_import_with_an_unknown_preset(tmp_path):
    assert_one_line_error(run("import", "wan", str(tmp_path), str(tmp_path / "out"), "--preset", "huge"), "--preset")


def test_fp8_on_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from helpers import prepared_demo

    dataset = prepared_demo(tmp_path / "d", num_episodes=1, frames_per_episode=21, image_size=64)
    result = run("train", "model.preset=tiny-mot", f"data.prepared=['{dataset}']", f"run.output_dir={tmp_path}",
                 "parallel.fp8=torchao")
    assert_one_line_error(result, "parallel.fp8=torchao", "CUDA")


def test_export_offers_the_post_training_folder_its_check_and_the_inference_bundle(capsys):
    from lbva.launchers.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    assert "{post-training,check,inference}" in capsys.readouterr().out
