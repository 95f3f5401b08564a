"""`lbva eval`: the world model of a checkpoint on held-out episodes, against its baselines."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

from lbva.evaluation.pictures import STRIP_FRAMES, VideoDecoder, comparison_frames, strip
from lbva.evaluation.run import EvalOptions, evaluate
from lbva.inference.settings import InferenceSettings
from lbva.launchers.cli import main as lbva
from lbva.training.trainer import train

from helpers import prepared_demo, tiny_train_config

KEYS = ("video_mse", "video_mse_sampled", "video_mse_copy_last", "action_mse", "action_mse_sampled", "action_mse_mean",
        "fm_video", "fm_video_gaussian_prior")
CHUNK = 2  # the test episodes have 6 latent frames: 3 chunks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=6, frames_per_episode=41, image_size=64, seed=5)


@pytest.fixture(scope="module")
def untrained(dataset, tmp_path_factory):
    """A run of one step at lr 1e-12: the weights of the initialisation, for all practical purposes."""
    config = tiny_train_config(dataset, tmp_path_factory.mktemp("runs"), "run.name=untrained", "run.steps=1",
                               "optim.lr=1e-12", "data.validation_fraction=0.34")
    return train(config, Console(quiet=True)).run_dir


def _options(point_draws: int = 2, **settings) -> EvalOptions:
    return EvalOptions(samples_per_source=2, rollout_chunks=2, pictures_per_source=1, point_draws=point_draws,
                       settings=InferenceSettings(chunk_size=CHUNK, video_steps=3, action_steps=3, video_guidance=1.0,
                                                  **settings))


def test_the_summary_has_every_metric_per_source_and_a_table(dataset, untrained, tmp_path):
    summary = evaluate(untrained, [dataset], tmp_path / "eval", _options())
    written = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for values in (written, written["sources"]["pusher"]):
        assert all(np.isfinite(values[key]) for key in KEYS)
    assert written["sources"]["pusher"]["episodes"] == 2
    table = (tmp_path / "eval" / "summary.md").read_text()
    assert "copy last frame" in table and "Gaussian prior" in table and "| pusher |" in table
    assert summary["pictures"] and all((tmp_path / "eval" / "pictures" / "pusher").glob("*.png"))


def test_the_same_checkpoint_and_seed_give_the_same_numbers(dataset, untrained, tmp_path):
    first = evaluate(untrained, [dataset], tmp_path / "a", _options())
    second = evaluate(untrained, [dataset], tmp_path / "b", _options())
    assert [first[k] for k in KEYS] == [second[k] for k in KEYS]


def test_a_model_that_has_not_trained_does_not_beat_the_baselines(dataset, untrained, tmp_path):
    summary = evaluate(untrained, [dataset], tmp_path / "eval", _options())
    for kind in ("", "_sampled"):
        assert summary[f"video_mse{kind}"] > summary["video_mse_copy_last"]
        assert summary[f"action_mse{kind}"] > summary["action_mse_mean"]
    assert summary["fm_video"] > summary["fm_video_gaussian_prior"]


def test_two_processes_score_what_one_process_scores(dataset, untrained, tmp_path):
    single = evaluate(untrained, [dataset], tmp_path / "one", _options())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lbva.launchers.cli", "eval", str(untrained), "--data", str(dataset), "--out",
               str(tmp_path / "two"), "--samples", "2", "--rollout-chunks", "2", "--pictures", "1",
               "--chunk-size", str(CHUNK), "--video-steps", "3", "--action-steps", "3", "--point-draws", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| pusher |" in result.stdout
    double = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [double[k] for k in KEYS] == pytest.approx([single[k] for k in KEYS], rel=1e-6)


def test_the_point_prediction_is_the_mean_of_its_draws(dataset, untrained, tmp_path):
    """More draws average away the noise each one-step estimate carries: the point scores move,
    the sampled ones (drawn from their own sampler) stay."""
    one = evaluate(untrained, [dataset], tmp_path / "one", _options(point_draws=1))
    four = evaluate(untrained, [dataset], tmp_path / "four", _options(point_draws=4))
    assert four["video_mse"] != one["video_mse"]
    assert four["video_mse_sampled"] == one["video_mse_sampled"]
    assert four["video_mse_copy_last"] == one["video_mse_copy_last"]


def test_the_strip_shows_truth_prediction_and_difference_per_latent_frame():
    decoder = VideoDecoder.for_card({"encoders": {"kind": "standin"}}, None)
    truth = torch.randn(48, 10, 4, 4)
    frames = comparison_frames(decoder, truth, truth)
    assert frames.shape == (10, 64, 3 * 64, 3) and frames.dtype == np.uint8
    picture = strip(frames)
    assert picture.shape == (3 * 64, STRIP_FRAMES * 64, 3)
    assert not picture[2 * 64:].any()  # a perfect prediction has no difference


def test_a_run_that_logs_to_wandb_gets_the_numbers_and_the_pictures(dataset, tmp_path):
    config = tiny_train_config(dataset, tmp_path, "run.name=logged", "run.steps=1", "run.wandb=offline",
                               "data.validation_fraction=0.34")
    run_dir = train(config, Console(quiet=True)).run_dir
    summary = evaluate(run_dir, [dataset], tmp_path / "eval", _options())
    # wandb's service writes the offline record on its own schedule and closes it when it shuts down,
    # which a CLI process does at exit; inside this test process, shut it down before reading.
    import wandb

    wandb.teardown()
    # Offline, each session of the run (training, then eval) gets a folder; the eval's is the newest.
    *_, session = sorted((run_dir / "wandb").glob("offline-run-*-logged"))
    media = {p.suffix for p in (session / "files" / "media").rglob("*") if p.is_file()}
    assert {".png", ".mp4"} <= media
    # An offline run keeps its summary in the run's record file, keys and JSON values as written.
    record = (session / "run-logged.wandb").read_bytes()
    assert b"eval/video_mse" in record and json.dumps(summary["video_mse"]).encode() in record


SMALL = ["--samples", "1", "--rollout-chunks", "1", "--pictures", "0", "--video-steps", "2", "--action-steps", "2"]


def test_several_video_guidance_scales_are_swept_into_one_table(dataset, untrained, tmp_path, capsys):
    assert lbva(["eval", str(untrained), "--data", str(dataset), "--out", str(tmp_path), "--chunk-size", str(CHUNK),
                 *SMALL, "--video-guidance", "1", "3"]) == 0
    table = capsys.readouterr().out.split("| video guidance |")[1]
    assert "\n| 1 | " in table and "\n| 3 | " in table
    scored = [json.loads((tmp_path / f"video_guidance_{g}" / "summary.json").read_text()) for g in ("1", "3")]
    assert [s["settings"]["video_guidance"] for s in scored] == [1.0, 3.0]
    assert scored[0]["video_mse_sampled"] != scored[1]["video_mse_sampled"]


def test_episodes_shorter_than_two_chunks_are_refused_in_one_line(dataset, untrained, tmp_path, capsys):
    assert lbva(["eval", str(untrained), "--data", str(dataset), "--out", str(tmp_path), "--chunk-size", "4",
                 *SMALL]) == 2
    assert "fewer than two chunks of 4; give a smaller --chunk-size" in capsys.readouterr().err


def test_eval_refuses_a_folder_without_a_checkpoint(tmp_path, capsys):
    assert lbva(["eval", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a committed lbva checkpoint" in capsys.readouterr().err
