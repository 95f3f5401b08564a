"""Fixtures for data preparation: tiny LeRobot v2.1 / v3.0 datasets, a tiny Wan VAE and a tiny umT5,
all built offline in temporary folders, and helpers that run `prepare` and read its output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from lbva.models.encoders import EncoderChoice
from lbva.training.data.demo_world import generate_demo_dataset, simulate_episode, write_mp4
from lbva.training.data.format import decode_members
from lbva.training.data.prepare import PrepareConfig, PrepareReport, prepare
from lbva.training.data.tiny_models import write_tiny_umt5, write_tiny_wan_vae

FPS = 20
SIZE = 64
HEAD, LEFT, RIGHT = (f"observation.images.{name}" for name in ("cam_high", "cam_left_wrist", "cam_right_wrist"))
WORDS = "push the red green blue block to left right top bottom approach it".split()


def write_v3_dataset(root: Path, episodes: list[dict], *, episodes_per_file: int = 2, fps: int = FPS) -> Path:
    """Write a LeRobot v3.0 dataset: episodes back to back in shared parquet and mp4 files.

    Each episode is {"frames": {camera: uint8 [T, H, W, 3]}, "actions": float32 [T, A] or None (video-only),
    "task": str} plus an optional "action_config" list of segments.
    """
    cameras = list(episodes[0]["frames"])
    has_actions = episodes[0]["actions"] is not None
    tasks: dict[str, int] = {}
    records, total = [], 0
    for first in range(0, len(episodes), episodes_per_file):
        file_index = first // episodes_per_file
        group = episodes[first:first + episodes_per_file]
        columns: dict[str, list] = {"timestamp": [], "frame_index": [], "episode_index": [], "index": [],
                                    "task_index": []}
        if has_actions:
            columns["action"] = []
        offset = 0
        for number, episode in enumerate(group, start=first):
            t = len(next(iter(episode["frames"].values())))
            task_index = tasks.setdefault(episode["task"], len(tasks))
            columns["timestamp"] += (np.arange(t) / fps).tolist()
            columns["frame_index"] += list(range(t))
            columns["episode_index"] += [number] * t
            columns["index"] += list(range(total, total + t))
            columns["task_index"] += [task_index] * t
            if has_actions:
                columns["action"] += episode["actions"].tolist()
            record = {"episode_index": number, "tasks": [episode["task"]], "length": t,
                      "data/chunk_index": 0, "data/file_index": file_index, "dataset_from_index": total,
                      "dataset_to_index": total + t, "stats/frame_index/max": [t - 1]}
            for camera in cameras:
                record.update({f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": file_index,
                               f"videos/{camera}/from_timestamp": offset / fps,
                               f"videos/{camera}/to_timestamp": (offset + t) / fps})
            # Every row carries the column (null where an episode has no segments), as in LeRobot's tables.
            record["action_config"] = episode.get("action_config")
            records.append(record)
            offset += t
            total += t
        types = {"action": pa.list_(pa.float32())}
        table = pa.table({name: pa.array(values, types.get(name)) for name, values in columns.items()})
        path = root / f"data/chunk-000/file-{file_index:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for camera in cameras:
            frames = np.concatenate([episode["frames"][camera] for episode in group])
            write_mp4(root / f"videos/{camera}/chunk-000/file-{file_index:03d}.mp4", frames, fps)
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), root / "meta/episodes/chunk-000/file-000.parquet")
    # pandas keeps the task strings as the frame's index, stored under this column name.
    pq.write_table(pa.table({"task_index": list(tasks.values()), "__index_level_0__": list(tasks)}),
                   root / "meta/tasks.parquet")
    features = {camera: {"dtype": "video", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "channels"]}
                for camera in cameras}
    if has_actions:
        features["action"] = {"dtype": "float32", "shape": [episodes[0]["actions"].shape[1]], "names": None}
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[name] = {"dtype": "int64", "shape": [1], "names": None}
    info = {"codebase_version": "v3.0", "fps": fps, "chunks_size": 1000, "total_episodes": len(episodes),
            "total_frames": total, "features": features,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    return root


def three_camera_episode(seed: int, num_frames: int, with_actions: bool = True) -> dict:
    """A demo-world episode seen by a head camera and two 'wrist' views derived from it."""
    episode = simulate_episode(np.random.default_rng([7, seed]), num_frames, SIZE)
    frames = episode.frames
    return {"frames": {HEAD: frames, LEFT: np.ascontiguousarray(frames[:, :, ::-1]),
                       RIGHT: np.ascontiguousarray(frames[:, ::-1])},
            "actions": episode.actions if with_actions else None, "task": episode.task}


@pytest.fixture(scope="session")
def v21_dataset(tmp_path_factory) -> Path:
    """4 demo episodes of 21 frames at 20 fps, 64 px, one camera; episode 1 has three action_config
    segments, the last too short for two latent frames at 10 fps."""
    root = generate_demo_dataset(tmp_path_factory.mktemp("v21") / "demo", num_episodes=4, frames_per_episode=21,
                                 fps=FPS, image_size=SIZE, seed=0)
    path = root / "meta" / "episodes.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["action_config"] = [
        {"start_frame": 0, "end_frame": 13, "action_text": "approach the block"},
        {"start_frame": 8, "end_frame": 21, "action_text": "push it to the left"},
        {"start_frame": 16, "end_frame": 21, "action_text": "push it"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="session")
def v3_dataset(tmp_path_factory) -> Path:
    """5 three-camera episodes (21, 25, 21, 17, 21 frames), two per file, at 20 fps and 64 px."""
    episodes = [three_camera_episode(i, n) for i, n in enumerate((21, 25, 21, 17, 21))]
    episodes[2]["action_config"] = [{"start_frame": 4, "end_frame": 21, "action_text": "push the blue block"}]
    return write_v3_dataset(tmp_path_factory.mktemp("v3") / "robot", episodes)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A randomly initialised AutoencoderKLWan with the Wan2.2 geometry and tiny widths."""
    return write_tiny_wan_vae(tmp_path_factory.mktemp("models") / "vae")


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory) -> Path:
    """A tiny UMT5EncoderModel and a word-level tokenizer that appends </s> like T5's, in one folder."""
    return write_tiny_umt5(tmp_path_factory.mktemp("models") / "umt5", WORDS)


@pytest.fixture(scope="session")
def run_standin() -> Callable[..., PrepareReport]:
    """prepare(src, out) with stand-in encoders, 64 px cameras, 10 fps and the demo's 2-d action map."""

    def run(src: Path, out: Path, **overrides) -> PrepareReport:
        settings = dict(target_fps=10, action_channels=[0, 1], heights=[SIZE], widths=[SIZE],
                        encoders=EncoderChoice("standin", standin_text_dim=16), shard_samples=2)
        settings.update(overrides)
        return prepare(PrepareConfig(src=src, out=out, **settings))

    return run


def read_shards(out: Path, source: str) -> dict[str, tuple]:
    """Every sample of every shard of a source, read with plain webdataset: key -> decode_members(...)."""
    shards = sorted(str(p) for p in (out / "shards" / source).glob("*.tar"))
    samples = {}
    for members in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        assert members["__key__"] not in samples, f"duplicate sample {members['__key__']}"
        samples[members["__key__"]] = decode_members(members)
    return samples


def read_index(out: Path, source: str) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "index" / source).glob("*.jsonl"))
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def shards_of() -> Callable[[Path, str], dict[str, tuple]]:
    return read_shards


@pytest.fixture(scope="session")
def index_of() -> Callable[[Path, str], list[dict]]:
    return read_index


@pytest.fixture(scope="session")
def make_v3() -> Callable[..., Path]:
    return write_v3_dataset


@pytest.fixture(scope="session")
def camera_episode() -> Callable[..., dict]:
    return three_camera_episode
