"""Read LeRobot v2.x datasets (v2.0 / v2.1) from local disk: meta jsonl, per-episode parquet and mp4.

Layout (what `meta/info.json` describes and LeRobot writes):
    meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl
    data/chunk-XXX/episode_XXXXXX.parquet        one row per frame: action, observation.state, ...
    videos/chunk-XXX/<camera_key>/episode_XXXXXX.mp4   one file per camera, one frame per row

Every problem with the data on disk is raised as a UserError naming the file and what is wrong, so a
bad dataset is reported in one line instead of a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lbva.training.errors import UserError


@dataclass
class RawEpisode:
    """One episode as stored: decoded frames and per-frame actions/states at the dataset's fps."""

    episode_index: int
    task: str
    fps: int
    frames: dict[str, np.ndarray]  # camera_key -> [len(frame_indices), H, W, 3] uint8
    frame_indices: np.ndarray  # [K] int64, the rows whose frames were decoded (all rows by default)
    actions: np.ndarray  # [T, A] float32, row t is the action issued at frame t
    states: np.ndarray | None  # [T, S] float32, or None when the dataset has no observation.state


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} is missing; a LeRobot v2 dataset needs it")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number} is not valid JSON ({err})") from err
    return records


def _vector_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    """A per-frame vector column (list, large_list or fixed_size_list of floats, or a scalar) -> [T, D]."""
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise UserError(f"{path}: column '{name}' has {column.null_count} empty rows")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
            or pa.types.is_fixed_size_list(column.type):
        lengths = pc.list_value_length(column).to_numpy()
        if len(lengths) and (lengths != lengths[0]).any():
            raise UserError(f"{path}: rows of column '{name}' have different lengths "
                            f"({lengths.min()} to {lengths.max()})")
        width = int(lengths[0]) if len(lengths) else 0
        values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    elif pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
        values = column.to_numpy(zero_copy_only=False).reshape(-1, 1)
    else:
        raise UserError(f"{path}: column '{name}' has type {column.type}, expected a list of numbers")
    values = values.astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise UserError(f"{path}: column '{name}' has NaN or inf values (first at row {row})")
    return values


class LeRobotDataset:
    """A LeRobot v2.x dataset on local disk; `read_episode` loads one episode at a time."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise UserError(f"{info_path} is missing; is {self.root} a LeRobot dataset folder?")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{info_path} is not valid JSON ({err})") from err
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v2"):
            raise UserError(f"{info_path}: codebase_version is '{version}', this reader handles LeRobot v2.x "
                            "(convert v3 datasets with LeRobot's converter or use a v2.1 revision)")
        for key in ("fps", "features", "data_path"):
            if key not in self.info:
                raise UserError(f"{info_path} has no '{key}' entry")
        self.fps = int(self.info["fps"])
        features = self.info["features"]
        if "action" not in features:
            raise UserError(f"{info_path}: the dataset has no 'action' feature")
        self.camera_keys = [key for key, feature in features.items() if feature.get("dtype") == "video"]
        if self.camera_keys and "video_path" not in self.info:
            raise UserError(f"{info_path} lists video features but no 'video_path'")
        self.chunks_size = int(self.info.get("chunks_size", 1000))

        episodes = _read_jsonl(self.root / "meta" / "episodes.jsonl")
        self._episodes = {int(e["episode_index"]): e for e in episodes}
        self._tasks = {int(t["task_index"]): str(t["task"]) for t in _read_jsonl(self.root / "meta" / "tasks.jsonl")}

    @property
    def episode_indices(self) -> list[int]:
        """The dataset's episode indices, ascending."""
        return sorted(self._episodes)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    def episode_length(self, episode_index: int) -> int:
        """Number of frames (parquet rows) of an episode, as meta/episodes.jsonl records it."""
        return int(self._episode_record(episode_index)["length"])

    def data_file(self, episode_index: int) -> Path:
        """Path of an episode's parquet file."""
        return self.root / self.info["data_path"].format(
            episode_chunk=episode_index // self.chunks_size, episode_index=episode_index)

    def video_file(self, episode_index: int, camera_key: str) -> Path:
        """Path of an episode's mp4 for one camera."""
        return self.root / self.info["video_path"].format(
            episode_chunk=episode_index // self.chunks_size, video_key=camera_key, episode_index=episode_index)

    def read_episode(self, episode_index: int, frame_indices: Sequence[int] | None = None) -> RawEpisode:
        """Load an episode: all actions/states and the frames at `frame_indices` (all frames by default).

        Frames come back in the order of `frame_indices`. Raises UserError for missing or unreadable
        files, a video whose frame count differs from the parquet rows, and NaN/inf actions or states.
        """
        record = self._episode_record(episode_index)
        path = self.data_file(episode_index)
        if not path.is_file():
            raise UserError(f"{path} is missing (episode {episode_index})")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{path} cannot be read as parquet ({err})") from err
        if "action" not in table.column_names:
            raise UserError(f"{path} has no 'action' column")
        actions = _vector_column(table, "action", path)
        states = None
        if "observation.state" in table.column_names:
            states = _vector_column(table, "observation.state", path)
        num_rows = len(actions)
        if "length" in record and int(record["length"]) != num_rows:
            raise UserError(f"{path} has {num_rows} rows but meta/episodes.jsonl gives episode {episode_index} "
                            f"length {record['length']}")

        indices = np.arange(num_rows) if frame_indices is None else np.asarray(frame_indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= num_rows):
            raise UserError(f"episode {episode_index} has {num_rows} frames; asked for frames "
                            f"{indices.min()}..{indices.max()}")
        frames = {key: self._decode(self.video_file(episode_index, key), path, num_rows, indices)
                  for key in self.camera_keys}
        return RawEpisode(episode_index, self._task(record, table, path), self.fps, frames, indices, actions, states)

    def _episode_record(self, episode_index: int) -> dict:
        if episode_index not in self._episodes:
            raise UserError(f"{self.root / 'meta' / 'episodes.jsonl'} has no episode {episode_index}")
        return self._episodes[episode_index]

    def _task(self, record: dict, table: pa.Table, path: Path) -> str:
        """The task of the episode's first frame, falling back to the episode record's task list."""
        if "task_index" in table.column_names and len(table):
            task_index = int(table.column("task_index")[0].as_py())
            if task_index not in self._tasks:
                raise UserError(f"{path}: task_index {task_index} is not in meta/tasks.jsonl")
            return self._tasks[task_index]
        tasks = record.get("tasks") or [""]
        return str(tasks[0])

    def _decode(self, video: Path, data: Path, num_rows: int, indices: np.ndarray) -> np.ndarray:
        """Decode `video` sequentially and keep the frames at `indices`: [len(indices), H, W, 3] uint8."""
        if not video.is_file():
            raise UserError(f"{video} is missing")
        wanted = set(indices.tolist())
        last_wanted = max(wanted, default=-1)
        decode_all = len(wanted) == num_rows
        kept: dict[int, np.ndarray] = {}
        count = 0
        try:
            with av.open(str(video)) as container:
                if not container.streams.video:
                    raise UserError(f"{video} has no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                shape = (stream.height, stream.width, 3)
                declared = stream.frames
                for frame in container.decode(stream):
                    if count in wanted:
                        kept[count] = frame.to_ndarray(format="rgb24")
                    count += 1
                    # Without a full decode the container's frame count stands in for the check below.
                    if not decode_all and count > last_wanted and declared:
                        count = declared
                        break
        except av.error.FFmpegError as err:
            raise UserError(f"{video} cannot be decoded ({err})") from err
        if count != num_rows:
            raise UserError(f"{video} has {count} frames but {data} has {num_rows} rows")
        if len(kept) != len(wanted):
            raise UserError(f"{video} could not decode frames {sorted(wanted - set(kept))[:5]}")
        if not kept:
            return np.zeros((0, *shape), np.uint8)
        return np.stack([kept[i] for i in indices.tolist()])
