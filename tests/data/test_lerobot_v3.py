"""The LeRobot reader on v3.0 data: episodes located in shared parquet and mp4 files through meta/episodes/."""

import json
import shutil

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lbva.errors import UserError
from lbva.training.data.demo_world import write_mp4
from lbva.training.data.lerobot import LeRobotDataset, Segment

HEAD, LEFT = "observation.images.cam_high", "observation.images.cam_left_wrist"
LENGTHS = (21, 25, 21, 17, 21)


def decode_file(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture
def copy(v3_dataset, tmp_path):
    """A private copy of the v3 dataset that a test may damage."""
    return shutil.copytree(v3_dataset, tmp_path / "robot")


def test_reader_exposes_the_v3_metadata(v3_dataset):
    dataset = LeRobotDataset(v3_dataset)
    assert (dataset.version, dataset.fps, dataset.has_actions) == ("v3.0", 20, True)
    assert dataset.camera_keys == [HEAD, LEFT, "observation.images.cam_right_wrist"]
    assert dataset.episode_indices == [0, 1, 2, 3, 4]
    assert [dataset.episode_length(i) for i in range(5)] == list(LENGTHS)


def test_episodes_share_data_and_video_files(v3_dataset):
    dataset = LeRobotDataset(v3_dataset)
    assert dataset.data_file(0) == dataset.data_file(1) != dataset.data_file(2)
    assert dataset.video_file(2, HEAD) == v3_dataset / f"videos/{HEAD}/chunk-000/file-001.mp4"


def test_an_episode_reads_its_own_window_of_a_shared_video(v3_dataset):
    dataset = LeRobotDataset(v3_dataset)
    whole = decode_file(dataset.video_file(1, LEFT))  # episodes 0 (21 frames) and 1 (25 frames)
    np.testing.assert_array_equal(dataset.read_episode(1).frames[LEFT], whole[21:46])
    np.testing.assert_array_equal(dataset.read_episode(0).frames[LEFT], whole[:21])


def test_selected_frames_of_a_later_episode_match_the_full_decode(v3_dataset):
    dataset = LeRobotDataset(v3_dataset)
    everything = dataset.read_episode(3).frames[HEAD]
    some = dataset.read_episode(3, frame_indices=[8, 0, 16])
    np.testing.assert_array_equal(some.frames[HEAD], everything[[8, 0, 16]])


def test_actions_come_from_the_episodes_rows_only(v3_dataset, camera_episode):
    dataset = LeRobotDataset(v3_dataset)
    expected = camera_episode(1, 25)
    episode = dataset.read_episode(1, frame_indices=[0])
    np.testing.assert_array_equal(episode.actions, expected["actions"])
    np.testing.assert_array_equal(dataset.read_actions(1), expected["actions"])
    assert episode.task == dataset.episode_task(1) == expected["task"]


def test_action_config_segments_are_read_from_the_episode_table(v3_dataset):
    dataset = LeRobotDataset(v3_dataset)
    assert dataset.segments(2) == [Segment(4, 21, "push the blue block")]
    assert dataset.segments(0) is None


def test_video_only_dataset_reads_zero_width_actions(tmp_path, make_v3, camera_episode):
    root = make_v3(tmp_path / "video", [camera_episode(0, 9, with_actions=False)])
    dataset = LeRobotDataset(root)
    assert not dataset.has_actions
    assert dataset.read_actions(0).shape == (9, 0)


def test_missing_episode_table_names_the_folder(copy):
    shutil.rmtree(copy / "meta" / "episodes")
    with pytest.raises(UserError, match=r"meta/episodes holds no chunk-\*/file-\*.parquet"):
        LeRobotDataset(copy)


def test_video_shorter_than_the_episode_window_is_a_frame_count_error(copy, camera_episode):
    dataset = LeRobotDataset(copy)
    # File 1 holds episodes 2 (21 frames) and 3 (17): keep 21 + 12 frames only.
    frames = np.concatenate([camera_episode(2, 21)["frames"][HEAD], camera_episode(3, 17)["frames"][HEAD][:12]])
    write_mp4(dataset.video_file(3, HEAD), frames, fps=20)
    with pytest.raises(UserError, match=r"file-001.mp4 has 12 frames from 1.050 s but .*file-001.parquet has 17 rows"):
        dataset.read_episode(3)


def test_episode_length_disagreeing_with_the_rows_is_reported(copy):
    path = copy / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path).to_pylist()
    table[4]["length"] = 30

    pq.write_table(pa.Table.from_pylist(table), path)
    with pytest.raises(UserError, match=r"file-002.parquet has 21 rows for episode 4 but .* gives length 30"):
        LeRobotDataset(copy).read_actions(4)


def test_info_json_of_v3_needs_its_paths(copy):
    info_path = copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    del info["data_path"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(UserError, match="has no 'data_path' entry"):
        LeRobotDataset(copy)
