"""The demo pushing world: actions cause what the video shows, and the LeRobot v2.1 files it writes."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lbva.training.data.demo_world import (
    AGENT_RADIUS, BLOCK_HALF, GOAL_DIRECTIONS, MAX_SPEED, PushWorld, generate_demo_dataset, simulate_episode,
)
from lbva.errors import UserError
from lbva.training.data.lerobot import LeRobotDataset

SIZE = 128


def dark_centroid(image: np.ndarray) -> np.ndarray:
    """Pixel centre (x, y) of the agent, the only dark shape in a frame."""
    ys, xs = np.nonzero((image < 90).all(-1))
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def colour_mask(image: np.ndarray, channel: int) -> np.ndarray:
    others = [c for c in range(3) if c != channel]
    return (image[..., channel] > 150) & (image[..., others] < 120).all(-1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", num_episodes=3, frames_per_episode=41,
                                 fps=20, image_size=64, seed=0)


def test_agent_moves_in_the_direction_of_the_summed_actions():
    world = PushWorld((0.3, 0.4), [], [], SIZE)
    start = dark_centroid(world.render())
    total = np.zeros(2)
    for command in [(0.03, 0.01), (0.02, 0.02), (0.03, 0.0), (0.01, 0.03)]:
        total += world.step(command)
    moved = dark_centroid(world.render()) - start
    np.testing.assert_allclose(moved, total * SIZE, atol=0.3)


def test_commands_are_clipped_to_max_speed():
    world = PushWorld((0.5, 0.5), [], [], SIZE)
    applied = world.step((1.0, 0.0))
    np.testing.assert_allclose(applied, [MAX_SPEED, 0.0], rtol=1e-6)
    assert world.agent[0] == pytest.approx(0.5 + MAX_SPEED)


def test_pushed_block_moves_and_untouched_block_does_not():
    world = PushWorld((0.2, 0.5), [(0.4, 0.5), (0.5, 0.85)], ["red", "blue"], SIZE)
    before = world.render()
    for _ in range(10):
        world.step((0.03, 0.0))
    after = world.render()
    red_shift = np.nonzero(colour_mask(after, 0))[1].mean() - np.nonzero(colour_mask(before, 0))[1].mean()
    assert red_shift > 0.1 * SIZE
    np.testing.assert_array_equal(colour_mask(after, 2), colour_mask(before, 2))


def test_wall_stops_a_pushed_block_and_the_agent_stops_against_it():
    world = PushWorld((0.6, 0.5), [(0.8, 0.5)], ["green"], SIZE)
    for _ in range(20):
        world.step((MAX_SPEED, 0.0))
    assert world.blocks[0][0] == pytest.approx(1.0 - BLOCK_HALF)
    assert world.agent[0] <= 1.0 - 2 * BLOCK_HALF - AGENT_RADIUS + 1e-6


def test_scripted_policy_pushes_the_named_block_towards_the_goal():
    progress = []
    for index in range(6):
        episode = simulate_episode(np.random.default_rng([0, index]), 97, 64)
        words = episode.task.split()  # "push the <colour> block to the <side>"
        target = episode.block_colors.index(words[2])
        travel = episode.blocks[-1, target] - episode.blocks[0, target]
        progress.append(float(travel @ np.array(GOAL_DIRECTIONS[words[-1]])))
    assert sum(p > 0.1 for p in progress) >= 5, progress


def test_dataset_has_the_lerobot_v21_layout(dataset):
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1"
    assert (info["total_episodes"], info["total_frames"], info["fps"]) == (3, 123, 20)
    assert info["splits"] == {"train": "0:3"}
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    assert info["features"]["action"] == {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]}
    episodes = [json.loads(line) for line in (dataset / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [e["length"] for e in episodes] == [41, 41, 41]
    tasks = [json.loads(line)["task"] for line in (dataset / "meta" / "tasks.jsonl").read_text().splitlines()]
    assert set(tasks) == {t for e in episodes for t in e["tasks"]}
    stats = json.loads((dataset / "meta" / "episodes_stats.jsonl").read_text().splitlines()[0])["stats"]
    assert set(stats["action"]) == {"min", "max", "mean", "std", "count"}
    assert (dataset / "videos/chunk-000/observation.images.top/episode_000002.mp4").is_file()


def test_parquet_columns_have_lerobot_types_and_a_global_index(dataset):
    table = pq.read_table(dataset / "data/chunk-000/episode_000001.parquet")
    assert table.schema.field("action").type == pa.list_(pa.float32())
    assert table.schema.field("observation.state").type == pa.list_(pa.float32())
    assert table.schema.field("timestamp").type == pa.float32()
    assert table.schema.field("task_index").type == pa.int64()
    assert table.column("index").to_pylist() == list(range(41, 82))
    assert set(table.column("episode_index").to_pylist()) == {1}


def test_recorded_actions_explain_the_state_changes(dataset):
    episode = LeRobotDataset(dataset).read_episode(0)
    explained = np.isclose(np.diff(episode.states, axis=0), episode.actions[:-1], atol=1e-5).all(-1)
    assert explained.mean() > 0.7  # the rest are steps where a wall or a block stopped the agent


def test_video_shows_the_agent_at_the_recorded_state(dataset):
    episode = LeRobotDataset(dataset).read_episode(2)
    frames = episode.frames["observation.images.top"]
    seen = np.stack([dark_centroid(frame) for frame in frames])
    np.testing.assert_allclose(seen, episode.states * 64, atol=1.0)


def test_same_seed_reproduces_the_dataset_and_another_seed_does_not(tmp_path):
    def actions(seed, name):
        root = generate_demo_dataset(tmp_path / name, num_episodes=2, frames_per_episode=9, image_size=32, seed=seed)
        return np.concatenate([pq.read_table(p).column("action").combine_chunks().flatten().to_numpy()
                               for p in sorted(root.glob("data/*/*.parquet"))])

    first, again, other = actions(0, "a"), actions(0, "b"), actions(1, "c")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_generation_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        generate_demo_dataset(tmp_path, num_episodes=1, frames_per_episode=5, image_size=32)
