"""The LeRobot reader on v2.1 data: round trips of the demo dataset, and one-line errors for bad data."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lbva.errors import UserError
from lbva.training.data.demo_world import generate_demo_dataset, simulate_episode, write_mp4
from lbva.training.data.lerobot import LeRobotDataset

CAMERA = "observation.images.top"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", num_episodes=2, frames_per_episode=21,
                                 fps=20, image_size=64, seed=3)


@pytest.fixture
def copy(source, tmp_path):
    """A private copy of the dataset that a test may damage."""
    return shutil.copytree(source, tmp_path / "ds")


def expected_episode(index):
    return simulate_episode(np.random.default_rng([3, index]), 21, 64)


def test_reader_exposes_the_dataset_metadata(source):
    dataset = LeRobotDataset(source)
    assert (dataset.fps, dataset.camera_keys) == (20, [CAMERA])
    assert (dataset.num_episodes, dataset.episode_indices) == (2, [0, 1])


def test_frames_round_trip_close_to_the_rendered_ones(source):
    frames = LeRobotDataset(source).read_episode(1).frames[CAMERA]
    rendered = expected_episode(1).frames
    assert frames.shape == rendered.shape and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - rendered).mean() < 3.0


def test_actions_and_states_round_trip_exactly(source):
    episode = LeRobotDataset(source).read_episode(1)
    expected = expected_episode(1)
    np.testing.assert_array_equal(episode.actions, expected.actions)
    np.testing.assert_array_equal(episode.states, expected.states)


def test_episode_carries_its_task_text_and_fps(source):
    episode = LeRobotDataset(source).read_episode(0)
    assert episode.task == expected_episode(0).task
    assert episode.fps == 20


def test_frame_indices_select_frames_in_the_order_asked(source):
    dataset = LeRobotDataset(source)
    everything = dataset.read_episode(0).frames[CAMERA]
    some = dataset.read_episode(0, frame_indices=[8, 0, 4])
    np.testing.assert_array_equal(some.frames[CAMERA], everything[[8, 0, 4]])
    assert len(some.actions) == 21


def test_missing_info_json_names_the_file(copy):
    (copy / "meta" / "info.json").unlink()
    with pytest.raises(UserError, match="meta/info.json is missing"):
        LeRobotDataset(copy)


def test_unsupported_codebase_version_is_rejected(copy):
    info_path = copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["codebase_version"] = "v1.6"
    info_path.write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"info.json: codebase_version is 'v1.6'"):
        LeRobotDataset(copy)


def test_missing_parquet_names_the_file(copy):
    dataset = LeRobotDataset(copy)
    dataset.data_file(1).unlink()
    with pytest.raises(UserError, match=r"episode_000001.parquet is missing"):
        dataset.read_episode(1)


def test_missing_mp4_names_the_file(copy):
    dataset = LeRobotDataset(copy)
    dataset.video_file(0, CAMERA).unlink()
    with pytest.raises(UserError, match=r"episode_000000.mp4 is missing"):
        dataset.read_episode(0)


def test_garbage_mp4_is_reported_as_undecodable(copy):
    dataset = LeRobotDataset(copy)
    dataset.video_file(0, CAMERA).write_bytes(b"not a video at all " * 50)
    with pytest.raises(UserError, match=r"episode_000000.mp4 cannot be decoded"):
        dataset.read_episode(0)


def test_truncated_mp4_is_reported_as_undecodable(copy):
    dataset = LeRobotDataset(copy)
    video = dataset.video_file(0, CAMERA)
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(UserError, match=r"episode_000000.mp4 cannot be decoded"):
        dataset.read_episode(0)


def test_nan_action_names_the_file_and_row(copy):
    dataset = LeRobotDataset(copy)
    path = dataset.data_file(0)
    table = pq.read_table(path)
    actions = table.column("action").to_pylist()
    actions[7][1] = float("nan")
    column = pa.array(actions, pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", column), path)
    expected = r"episode_000000.parquet: column 'action' has NaN or inf values \(first at row 7\)"
    with pytest.raises(UserError, match=expected):
        dataset.read_episode(0)


def test_video_shorter_than_the_parquet_is_a_frame_count_error(copy):
    dataset = LeRobotDataset(copy)
    write_mp4(dataset.video_file(1, CAMERA), expected_episode(1).frames[:17], fps=20)
    with pytest.raises(UserError, match=r"episode_000001.mp4 has 17 frames but .*episode_000001.parquet has 21 rows"):
        dataset.read_episode(1)


def test_frame_count_is_checked_when_decoding_only_some_frames(copy):
    dataset = LeRobotDataset(copy)
    write_mp4(dataset.video_file(1, CAMERA), expected_episode(1).frames[:17], fps=20)
    with pytest.raises(UserError, match="has 17 frames"):
        dataset.read_episode(1, frame_indices=[0, 4])


def _rewrite_episodes(root, edit):
    path = root / "meta" / "episodes.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in edit(records)))


def test_a_repeated_episode_index_is_refused_naming_the_file(copy):
    _rewrite_episodes(copy, lambda records: [*records, dict(records[0], length=5)])
    with pytest.raises(UserError, match=r"episodes.jsonl: episode_index 0 appears twice \(records 1 and 3\)"):
        LeRobotDataset(copy)


@pytest.mark.parametrize("length", [-4, 2.5, "21"])
def test_a_length_that_is_not_a_whole_number_is_refused(copy, length):
    _rewrite_episodes(copy, lambda records: [dict(records[0], length=length), records[1]])
    with pytest.raises(UserError, match=r"episodes.jsonl: episode 0 has length .*a whole number >= 0"):
        LeRobotDataset(copy)


def test_a_stated_fps_that_the_videos_do_not_play_at_is_refused(copy):
    info = json.loads((copy / "meta" / "info.json").read_text())
    (copy / "meta" / "info.json").write_text(json.dumps(dict(info, fps=40)))
    with pytest.raises(UserError, match=r"episode_000000.mp4 plays at 20 fps but .*info.json states fps 40"):
        LeRobotDataset(copy).read_episode(0)
