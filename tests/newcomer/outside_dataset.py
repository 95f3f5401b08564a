"""An outside LeRobot v2.1 dataset as a newcomer brings it: not the demo world's layout. Two cameras
of 64x96 px at 15 fps, 4-d actions named ee_x, ee_y, ee_z, gripper, a 3-d state, three tasks. The
frames show a moving bar, so the encoders get varied pixels; nothing else here is realistic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lbva.training.data.demo_world import write_mp4

FPS = 15
HEIGHT, WIDTH = 64, 96
CAMERAS = ("observation.images.front", "observation.images.wrist")
ACTION_NAMES = ["ee_x", "ee_y", "ee_z", "gripper"]
TASKS = ["pick up the cube", "open the drawer", "wipe the table"]
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def _frames(rng: np.random.Generator, length: int, shift: int) -> np.ndarray:
    """[length, H, W, 3] uint8: a bright bar sweeping across a noisy background."""
    frames = rng.integers(0, 60, (length, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(length):
        column = (shift + 5 * t) % (WIDTH - 8)
        frames[t, :, column:column + 8] = 220
    return frames


def _vector(values: np.ndarray) -> pa.ListArray:
    return pa.array(list(values.astype(np.float32)), type=pa.list_(pa.float32()))


def write_outside_dataset(root: Path, *, episodes: int = 6, length: int = 17, seed: int = 0) -> Path:
    """Write the dataset to root; returns root."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    records, total = [], 0
    for episode in range(episodes):
        task = episode % len(TASKS)
        actions = np.cumsum(rng.normal(0, 0.1, (length, len(ACTION_NAMES))), axis=0)
        table = pa.table({
            "action": _vector(actions), "observation.state": _vector(actions[:, :3]),
            "timestamp": pa.array(np.arange(length, dtype=np.float32) / FPS),
            "frame_index": pa.array(np.arange(length)), "episode_index": pa.array(np.full(length, episode)),
            "index": pa.array(np.arange(total, total + length)), "task_index": pa.array(np.full(length, task)),
        })
        path = root / DATA_PATH.format(episode_chunk=0, episode_index=episode)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for number, camera in enumerate(CAMERAS):
            write_mp4(root / VIDEO_PATH.format(episode_chunk=0, video_key=camera, episode_index=episode),
                      _frames(rng, length, 11 * episode + 30 * number), FPS)
        records.append({"episode_index": episode, "tasks": [TASKS[task]], "length": length})
        total += length
    (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    video = {"dtype": "video", "shape": [HEIGHT, WIDTH, 3], "names": ["height", "width", "channels"],
             "info": {"video.height": HEIGHT, "video.width": WIDTH, "video.fps": FPS}}
    info = {
        "codebase_version": "v2.1", "fps": FPS, "chunks_size": 1000, "total_episodes": episodes,
        "data_path": DATA_PATH, "video_path": VIDEO_PATH,
        "features": {
            **{camera: video for camera in CAMERAS},
            "action": {"dtype": "float32", "shape": [len(ACTION_NAMES)], "names": ACTION_NAMES},
            "observation.state": {"dtype": "float32", "shape": [3], "names": {"axes": ["x", "y", "z"]}},
        },
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return root
