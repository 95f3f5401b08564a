"""Bad data is counted, logged with file and episode, and skipped (or fails with --on-error fail);
bad settings and a missing dataset are one-line UserErrors."""

import argparse
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lbva.errors import UserError
from lbva.training.data.cli import register
from lbva.training.data.demo_world import simulate_episode, write_mp4
from lbva.training.data.lerobot import LeRobotDataset

CAMERA = "observation.images.top"


@pytest.fixture
def copy(v21_dataset, tmp_path):
    return shutil.copytree(v21_dataset, tmp_path / "demo")


def corrupt_video(root, episode):
    LeRobotDataset(root).video_file(episode, CAMERA).write_bytes(b"not a video at all " * 50)


def nan_action(root, episode):
    path = LeRobotDataset(root).data_file(episode)
    table = pq.read_table(path)
    actions = table.column("action").to_pylist()
    actions[5][0] = float("nan")
    column = pa.array(actions, pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", column), path)


def short_video(root, episode):
    frames = simulate_episode(np.random.default_rng([0, episode]), 21, 64).frames[:17]
    write_mp4(LeRobotDataset(root).video_file(episode, CAMERA), frames, fps=20)


BAD_DATA = {
    "corrupt mp4": (corrupt_video, r"episode_000002.mp4 cannot be decoded"),
    "NaN action": (nan_action, r"episode_000002.parquet: column 'action' has NaN or inf values \(first at row 5\)"),
    "length mismatch": (short_video, r"episode_000002.mp4 has 17 frames but .*episode_000002.parquet has 21 rows"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_episode_is_skipped_counted_and_named(case, copy, tmp_path, run_standin, shards_of, caplog):
    damage, message = BAD_DATA[case]
    damage(copy, 2)
    report = run_standin(copy, tmp_path / "out")
    assert [error.episode for error in report.errors] == [2]
    assert re.search(message, report.errors[0].message)
    assert "skipping episode 2" in caplog.text and "episode_000002" in caplog.text
    keys = sorted(shards_of(tmp_path / "out", "demo"))
    assert "demo__e000002__s000" not in keys and len(keys) == 4


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_fail_mode_stops_with_a_user_error_and_no_partial_shard(case, copy, tmp_path, run_standin):
    damage, message = BAD_DATA[case]
    damage(copy, 2)
    with pytest.raises(UserError, match=f"demo: episode 2: .*{message}"):
        run_standin(copy, tmp_path / "out", on_error="fail")
    assert sorted(p.name for p in (tmp_path / "out" / "shards" / "demo").iterdir()) == ["t000-00000.tar"]


def test_nan_episode_is_left_out_of_the_action_statistics(copy, tmp_path, run_standin):
    nan_action(copy, 2)
    run_standin(copy, tmp_path / "out")
    stats = (tmp_path / "out" / "stats" / "demo.json").read_text()
    assert "NaN" not in stats


def test_missing_dataset_folder_is_named(tmp_path, run_standin):
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'}/meta/info.json is missing"):
        run_standin(tmp_path / "nowhere", tmp_path / "out")


def test_wrong_number_of_action_channels_is_refused(v21_dataset, tmp_path, run_standin):
    with pytest.raises(UserError, match="gives 3 slots but the dataset's actions have 2 dims"):
        run_standin(v21_dataset, tmp_path / "out", action_channels=[0, 1, 2])


def test_target_fps_must_divide_the_dataset_fps(v21_dataset, tmp_path, run_standin):
    with pytest.raises(UserError, match="fps 20 is not a positive integer multiple of target_fps 3"):
        run_standin(v21_dataset, tmp_path / "out", target_fps=3)


def test_unknown_camera_is_refused(v21_dataset, tmp_path, run_standin):
    with pytest.raises(UserError, match="cameras \\['observation.images.side'\\] are not video features"):
        run_standin(v21_dataset, tmp_path / "out", cameras=["observation.images.side"])


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["data", "prepare", *map(str, argv)])
    args.func(args)


def test_cli_prepares_with_standin_encoders_and_prints_a_summary(v21_dataset, tmp_path, capsys):
    run_cli(v21_dataset, tmp_path / "out", "--encoders", "standin", "--standin-text-dim", "16",
            "--action-channels", "0,1", "--height", "64", "--width", "64", "--shard-samples", "2")
    assert "demo: 2 shards (5 samples) written, 0 already done" in capsys.readouterr().out


def test_cli_real_encoders_need_their_folders(v21_dataset, tmp_path):
    with pytest.raises(UserError, match="--encoders real needs --vae DIR and --text-encoder DIR"):
        run_cli(v21_dataset, tmp_path / "out", "--action-channels", "0,1")
