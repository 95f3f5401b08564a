"""Read LeRobot datasets from local disk: v2.x (one file per episode) and v3.0 (many episodes per file).

v2.0 / v2.1 layout:
    meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl
    data/chunk-XXX/episode_XXXXXX.parquet              one row per frame: action, observation.state, ...
    videos/chunk-XXX/<camera_key>/episode_XXXXXX.mp4   one file per camera, one frame per row
v3.0 layout:
    meta/info.json, meta/tasks.parquet (task string + task_index)
    meta/episodes/chunk-XXX/file-XXX.parquet   one row per episode: length, tasks, data/chunk_index,
        data/file_index, dataset_from_index, dataset_to_index, videos/<key>/chunk_index, .../file_index,
        .../from_timestamp, .../to_timestamp
    data/chunk-XXX/file-XXX.parquet            rows of many episodes, told apart by `episode_index`
    videos/<key>/chunk-XXX/file-XXX.mp4        episodes back to back; an episode is its timestamp window

An episode record may carry `action_config`, a list of {start_frame, end_frame, action_text} segments
(spec 6.2). A dataset without an `action` feature is video-only: its actions read as [T, 0].

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

from lbva.errors import UserError


# The per-frame columns an episode read needs; image columns and the like are never loaded.
ROW_COLUMNS = ("episode_index", "task_index", "action", "observation.state")


@dataclass
class RawEpisode:
    """One episode as stored: decoded frames and per-frame actions/states at the dataset's fps."""

    episode_index: int
    task: str
    fps: int
    frames: dict[str, np.ndarray]  # camera_key -> [len(frame_indices), H, W, 3] uint8
    frame_indices: np.ndarray  # [K] int64, the rows whose frames were decoded (all rows by default)
    actions: np.ndarray  # [T, A] float32, row t is the action issued at frame t; A = 0 when video-only
    states: np.ndarray | None  # [T, S] float32, or None when the dataset has no observation.state


@dataclass(frozen=True)
class Segment:
    """A sub-range of an episode with its own instruction: raw frames [start_frame, end_frame)."""

    start_frame: int
    end_frame: int
    text: str


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


def _episode_table(records: list[dict], where: Path) -> dict[int, dict]:
    """Episode records by episode_index. A repeated index or a length that is not a whole number
    >= 0 is refused naming the file: either would otherwise drop an episode or mis-plan its frames."""
    table: dict[int, dict] = {}
    record_of: dict[int, int] = {}
    for number, record in enumerate(records, start=1):
        index, length = record.get("episode_index"), record.get("length")
        if isinstance(index, bool) or not isinstance(index, int):
            raise UserError(f"{where}: record {number} has episode_index {index!r}, not a whole number")
        if index in table:
            raise UserError(f"{where}: episode_index {index} appears twice (records {record_of[index]} and {number})")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise UserError(f"{where}: episode {index} has length {length!r}; a length is a whole number >= 0")
        table[index], record_of[index] = record, number
    return table


def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The table at `path`, or those of `columns` it has (all columns with None)."""
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        if columns is not None:
            names = set(pq.read_schema(path).names)
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} cannot be read as parquet ({err})") from err


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
    """A LeRobot v2.x or v3.0 dataset on local disk; `read_episode` loads one episode at a time."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise UserError(f"{info_path} is missing; is {self.root} a LeRobot dataset folder?")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{info_path} is not valid JSON ({err})") from err
        self.version = str(self.info.get("codebase_version", ""))
        if not (self.version.startswith("v2") or self.version.startswith("v3")):
            raise UserError(f"{info_path}: codebase_version is '{self.version}', this reader handles LeRobot "
                            "v2.x and v3.0")
        for key in ("fps", "features", "data_path"):
            if key not in self.info:
                raise UserError(f"{info_path} has no '{key}' entry")
        self.fps = int(self.info["fps"])
        features = self.info["features"]
        self.has_actions = "action" in features
        self.camera_keys = [key for key, feature in features.items() if feature.get("dtype") == "video"]
        if self.camera_keys and not self.info.get("video_path"):
            raise UserError(f"{info_path} lists video features but no 'video_path'")
        self.chunks_size = int(self.info.get("chunks_size", 1000))
        self._is_v3 = self.version.startswith("v3")
        if self._is_v3:
            self._episodes, self._tasks = self._read_v3_meta()
        else:
            episodes_path = self.root / "meta" / "episodes.jsonl"
            self._episodes = _episode_table(_read_jsonl(episodes_path), episodes_path)
            self._tasks = {int(t["task_index"]): str(t["task"])
                           for t in _read_jsonl(self.root / "meta" / "tasks.jsonl")}
        self._cached_table: tuple[Path, pa.Table] | None = None

    def _read_v3_meta(self) -> tuple[dict[int, dict], dict[int, str]]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise UserError(f"{self.root / 'meta' / 'episodes'} holds no chunk-*/file-*.parquet; a LeRobot v3.0 "
                            "dataset needs its episode table")
        records: list[dict] = []
        for path in files:
            # Per-episode statistics are most of the table and nothing here needs them.
            try:
                names = [n for n in pq.read_schema(path).names if not n.startswith("stats/")]
            except (pa.ArrowException, OSError) as err:
                raise UserError(f"{path} cannot be read as parquet ({err})") from err
            records += _read_parquet(path, names).to_pylist()
        episodes = _episode_table(records, self.root / "meta" / "episodes")
        tasks_path = self.root / "meta" / "tasks.parquet"
        table = _read_parquet(tasks_path)
        # pandas writes the task strings as the frame's index, whose column name varies.
        text = next((n for n in table.column_names if pa.types.is_string(table.schema.field(n).type)), None)
        if text is None or "task_index" not in table.column_names:
            raise UserError(f"{tasks_path} needs a task_index column and a string column of tasks")
        tasks = dict(zip(table.column("task_index").to_pylist(), table.column(text).to_pylist()))
        return episodes, {int(k): str(v) for k, v in tasks.items()}

    def camera_size(self, camera_key: str) -> tuple[int, int]:
        """(height, width) in pixels of a video feature, as info.json records it."""
        feature = self.info["features"][camera_key]
        details = feature.get("info") or feature.get("video_info") or {}
        if "video.height" in details and "video.width" in details:
            return int(details["video.height"]), int(details["video.width"])
        shape, names = feature.get("shape", []), feature.get("names") or []
        if len(shape) == 3 and list(names)[:3] in (["height", "width", "channels"], ["channels", "height", "width"]):
            return int(shape[names.index("height")]), int(shape[names.index("width")])
        if len(shape) == 3:
            return int(shape[0]), int(shape[1])
        raise UserError(f"{self.root / 'meta' / 'info.json'}: video feature '{camera_key}' records no height and "
                        "width (features.KEY.shape or info.video.height/width)")

    def feature_names(self, key: str) -> list[str]:
        """The per-dim names of a vector feature (`action`, `observation.state`) as info.json gives them
        (a list, or a dict of lists such as {"motors": [...]}); "dim i" for dims it leaves unnamed."""
        feature = self.info["features"].get(key)
        if feature is None:
            return []
        dims = int(np.prod(feature.get("shape", [0]))) if feature.get("shape") else 0
        names = feature.get("names") or []
        if isinstance(names, dict):
            names = [name for group in names.values() for name in (group if isinstance(group, list) else [group])]
        names = [str(name) for name in names]
        return names if len(names) == dims else [f"dim {i}" for i in range(dims)]

    def texts(self) -> list[str]:
        """Every instruction text of the dataset, sorted: the task table and the episodes'
        `action_config` segment texts (what prepare encodes with the text encoder)."""
        texts = set(self._tasks.values())
        for record in self._episodes.values():
            texts.update(str(tasks) for tasks in record.get("tasks") or [])
            texts.update(str(item.get("action_text", "")) for item in record.get("action_config") or []
                         if isinstance(item, dict))
        return sorted(text for text in texts if text)

    @property
    def episode_indices(self) -> list[int]:
        """The dataset's episode indices, ascending."""
        return sorted(self._episodes)

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    def episode_length(self, episode_index: int) -> int:
        """Number of frames (parquet rows) of an episode, as the episode metadata records it."""
        return int(self._episode_record(episode_index)["length"])

    def episode_task(self, episode_index: int) -> str:
        """The episode's first task as the episode metadata lists it ("" when it lists none)."""
        tasks = self._episode_record(episode_index).get("tasks") or [""]
        return str(tasks[0])

    def segments(self, episode_index: int) -> list[Segment] | None:
        """The episode's `action_config` segments, or None when its metadata has none.

        Raises UserError when a segment is malformed or its frame range lies outside the episode.
        """
        config = self._episode_record(episode_index).get("action_config")
        if not config:
            return None
        length = self.episode_length(episode_index)
        segments = []
        for number, item in enumerate(config):
            try:
                segment = Segment(int(item["start_frame"]), int(item["end_frame"]), str(item["action_text"]))
            except (KeyError, TypeError, ValueError) as err:
                raise UserError(f"{self._meta_name}: episode {episode_index} action_config[{number}] needs "
                                f"start_frame, end_frame and action_text ({err!r})") from err
            if not 0 <= segment.start_frame < segment.end_frame <= length:
                raise UserError(f"{self._meta_name}: episode {episode_index} action_config[{number}] spans frames "
                                f"{segment.start_frame}..{segment.end_frame}, outside the episode's {length} frames")
            segments.append(segment)
        return segments

    def data_file(self, episode_index: int) -> Path:
        """Path of the parquet file holding an episode's rows."""
        if self._is_v3:
            record = self._episode_record(episode_index)
            return self.root / self.info["data_path"].format(
                chunk_index=int(record["data/chunk_index"]), file_index=int(record["data/file_index"]))
        return self.root / self.info["data_path"].format(
            episode_chunk=episode_index // self.chunks_size, episode_index=episode_index)

    def video_file(self, episode_index: int, camera_key: str) -> Path:
        """Path of the mp4 holding an episode's frames for one camera."""
        if self._is_v3:
            record = self._episode_record(episode_index)
            return self.root / self.info["video_path"].format(
                video_key=camera_key, chunk_index=int(record[f"videos/{camera_key}/chunk_index"]),
                file_index=int(record[f"videos/{camera_key}/file_index"]))
        return self.root / self.info["video_path"].format(
            episode_chunk=episode_index // self.chunks_size, video_key=camera_key, episode_index=episode_index)

    def read_actions(self, episode_index: int) -> np.ndarray:
        """An episode's actions [T, A] float32 without decoding video (A = 0 for a video-only dataset)."""
        table, path = self._rows(episode_index)
        return self._actions(table, path)

    def read_episode(self, episode_index: int, frame_indices: Sequence[int] | None = None) -> RawEpisode:
        """Load an episode: all actions/states and the frames at `frame_indices` (all frames by default).

        Frames come back in the order of `frame_indices`. Raises UserError for missing or unreadable
        files, a video whose frame count differs from the parquet rows, and NaN/inf actions or states.
        """
        table, path = self._rows(episode_index)
        actions = self._actions(table, path)
        states = None
        if "observation.state" in table.column_names:
            states = _vector_column(table, "observation.state", path)
        num_rows = len(table)
        indices = np.arange(num_rows) if frame_indices is None else np.asarray(frame_indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= num_rows):
            raise UserError(f"episode {episode_index} has {num_rows} frames; asked for frames "
                            f"{indices.min()}..{indices.max()}")
        frames = {}
        for key in self.camera_keys:
            start = None
            if self._is_v3:
                start = float(self._episode_record(episode_index)[f"videos/{key}/from_timestamp"])
            frames[key] = self._decode(self.video_file(episode_index, key), path, num_rows, indices, start)
        task = self._task(episode_index, table, path)
        return RawEpisode(episode_index, task, self.fps, frames, indices, actions, states)

    @property
    def _meta_name(self) -> Path:
        return self.root / "meta" / ("episodes" if self._is_v3 else "episodes.jsonl")

    def _episode_record(self, episode_index: int) -> dict:
        if episode_index not in self._episodes:
            raise UserError(f"{self._meta_name} has no episode {episode_index}")
        return self._episodes[episode_index]

    def _rows(self, episode_index: int) -> tuple[pa.Table, Path]:
        """The parquet rows of one episode and the file they came from; the row count is checked."""
        path = self.data_file(episode_index)
        if self._is_v3:
            # Workers walk episodes in order, so consecutive episodes mostly share a data file.
            if self._cached_table is None or self._cached_table[0] != path:
                self._cached_table = (path, _read_parquet(path, ROW_COLUMNS))
            table = self._cached_table[1]
            if "episode_index" not in table.column_names:
                raise UserError(f"{path} has no 'episode_index' column")
            table = table.filter(pc.equal(table.column("episode_index"), episode_index))
        else:
            table = _read_parquet(path, ROW_COLUMNS)
        length = self.episode_length(episode_index)
        if len(table) != length:
            raise UserError(f"{path} has {len(table)} rows for episode {episode_index} but {self._meta_name} "
                            f"gives length {length}")
        return table, path

    def _actions(self, table: pa.Table, path: Path) -> np.ndarray:
        if not self.has_actions:
            return np.zeros((len(table), 0), np.float32)
        if "action" not in table.column_names:
            raise UserError(f"{path} has no 'action' column")
        return _vector_column(table, "action", path)

    def _task(self, episode_index: int, table: pa.Table, path: Path) -> str:
        """The task of the episode's first frame, falling back to the episode record's task list."""
        if "task_index" in table.column_names and len(table):
            task_index = int(table.column("task_index")[0].as_py())
            if task_index not in self._tasks:
                raise UserError(f"{path}: task_index {task_index} is not in the dataset's task table")
            return self._tasks[task_index]
        return self.episode_task(episode_index)

    def _check_rate(self, video: Path, rate) -> None:
        """The video's own frame rate must be info.json's fps: frames are picked by a stride in
        that fps, so a 20 fps video under a stated 40 fps would be prepared at half the rate."""
        if rate is not None and abs(float(rate) - self.fps) > 0.01 * self.fps:
            raise UserError(f"{video} plays at {float(rate):g} fps but {self.root / 'meta' / 'info.json'} states "
                            f"fps {self.fps}")

    def _decode(self, video: Path, data: Path, num_rows: int, indices: np.ndarray,
                start: float | None) -> np.ndarray:
        """Decode the frames at `indices` of one episode: [len(indices), H, W, 3] uint8.

        `start` is the episode's first timestamp in a shared v3.0 file, where frame i is the one shown
        at start + i / fps; with None the whole file is the episode and frames count in decode order.
        """
        if not video.is_file():
            raise UserError(f"{video} is missing")
        wanted = set(indices.tolist())
        last_wanted = max(wanted, default=-1)
        decode_all = len(wanted) == num_rows
        kept: dict[int, np.ndarray] = {}
        count = 0  # frames of this episode seen so far
        exhausted = True  # the decode ran to the end of the episode (or file), so `count` is its length
        try:
            with av.open(str(video)) as container:
                if not container.streams.video:
                    raise UserError(f"{video} has no video stream")
                stream = container.streams.video[0]
                self._check_rate(video, stream.average_rate or stream.guessed_rate)
                stream.thread_type = "AUTO"
                shape = (stream.height, stream.width, 3)
                declared = stream.frames
                if start:
                    container.seek(int(start / stream.time_base), stream=stream)
                for frame in container.decode(stream):
                    if start is None:
                        position = count
                    elif frame.time is None:
                        raise UserError(f"{video} has frames without timestamps; cannot find episode frames in it")
                    else:
                        position = round((frame.time - start) * self.fps)
                        if position < 0:
                            continue  # before the episode: the seek lands on an earlier keyframe
                        if position >= num_rows:
                            break
                    if position in wanted:
                        kept[position] = frame.to_ndarray(format="rgb24")
                    count = position + 1
                    if not decode_all and count > last_wanted:
                        if start is not None:
                            exhausted = False
                            break
                        if declared:
                            # A v2 file's declared frame count stands in for the full decode's count.
                            count = declared
                            break
        except av.error.FFmpegError as err:
            raise UserError(f"{video} cannot be decoded ({err})") from err
        if exhausted and count != num_rows:
            where = "" if start is None else f" from {start:.3f} s"
            raise UserError(f"{video} has {count} frames{where} but {data} has {num_rows} rows")
        if len(kept) != len(wanted):
            raise UserError(f"{video} could not decode frames {sorted(wanted - set(kept))[:5]}")
        if not kept:
            return np.zeros((0, *shape), np.uint8)
        return np.stack([kept[i] for i in indices.tolist()])
