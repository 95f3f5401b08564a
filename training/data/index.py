"""The index of a prepared source as columns: what the plan and the reader need of every sample,
held in flat arrays that every rank and loader worker memory-maps instead of parsing.

    OUT/index/{source}/t{task:03d}.jsonl   the source of truth, written by `lbva data prepare`
    OUT/index/{source}/columns.idx         this table, built from all of them (prepare writes it at
                                           the end of each task; `lbva data index OUT` rebuilds it)

columns.idx is one file: MAGIC, the byte length of a JSON header (uint64, little-endian), the header,
then one column of `count` values per name, each starting on a 64-byte boundary:
    key               S{w}   sample key, UTF-8, NUL-padded
    shard             int32  position in header["shards"] (shard paths relative to OUT)
    episode           int64
    latent_frames     int32
    tokens_per_frame  int32  video + action tokens of one copy of one latent frame
    offset, size      int64  the sample's byte range in its shard tar (-1: unknown; the reader then
                             scans the shard's tar headers once)
The header also holds the source's fingerprint (computed once, when the table is built), the problems
found in the jsonl lines (reported again whenever the table is read), and the size and mtime of each
jsonl file it was built from: a table whose jsonl files have changed since is out of date, and
`read_source` then parses the jsonl instead (warning once) until the table is rebuilt.

Rows are in the order reader.read_index has always used (jsonl files by name, lines in file order, bad
and duplicate lines left out), so the plan over a table is the plan over the jsonl lines.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lbva.errors import UserError

log = logging.getLogger("lbva.data")

TABLE_NAME = "columns.idx"
TABLE_VERSION = 1
MAGIC = b"LBVAIDX\x00"
_ALIGN = 64
_COLUMNS = {"shard": "<i4", "episode": "<i8", "latent_frames": "<i4", "tokens_per_frame": "<i4",
            "offset": "<i8", "size": "<i8"}  # and "key", whose width depends on the keys

Problem = tuple[str, str, str, str]  # kind, key, shard, detail: the fields of reader.BadRecord


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One sample as the plan and the reader see it, without reading it."""

    key: str
    source: str
    shard: Path
    latent_frames: int
    tokens_per_frame: int  # video + action tokens of one copy of one latent frame
    episode: int = -1
    byte_range: tuple[int, int] | None = None  # [first, end) bytes of the sample in its shard tar

    @property
    def num_frames(self) -> int:
        """The name `packing.cut_windows` reads, so windows are cut from the index alone."""
        return self.latent_frames


def table_path(root: Path, source: str) -> Path:
    return Path(root) / "index" / source / TABLE_NAME


def _jsonl_files(root: Path, source: str) -> list[Path]:
    return sorted((Path(root) / "index" / source).glob("t*.jsonl"))


def _jsonl_stamps(files: Sequence[Path]) -> dict[str, list[int]]:
    stamps = {}
    for path in files:
        stat = path.stat()
        stamps[path.name] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _entry_line(key: str, shard_name: str, frames: int, tokens_per_frame: int) -> bytes:
    return f"{key}\t{shard_name}\t{frames}\t{tokens_per_frame}\n".encode()


class IndexTable:
    """The columns of one source (memory-mapped when read from columns.idx, in memory when parsed
    from the jsonl lines), its shard names, fingerprint and recorded problems."""

    def __init__(self, columns: dict[str, np.ndarray], shards: list[str], fingerprint: str,
                 problems: list[Problem], stamps: dict[str, list[int]], path: Path | None = None):
        self.columns, self.shards, self.fingerprint = columns, shards, fingerprint
        self.problems, self.stamps, self.path = problems, stamps, path

    def __len__(self) -> int:
        return len(self.columns["key"])

    # A memory-mapped table travels to loader workers (spawned or forked) as its path, not its data.
    def __getstate__(self) -> dict:
        if self.path is not None:
            return {"path": self.path}
        return dict(vars(self))

    def __setstate__(self, state: dict) -> None:
        if set(state) == {"path"}:
            state = dict(vars(open_table(state["path"])))
        vars(self).update(state)

    @classmethod
    def from_rows(cls, keys: Sequence[str], shards: Sequence[str], shard_ids: np.ndarray, episodes: np.ndarray,
                  latent_frames: np.ndarray, tokens_per_frame: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                  problems: Sequence[Problem] = (), stamps: dict[str, list[int]] | None = None) -> IndexTable:
        """A table from per-row values; computes the fingerprint (one pass in Python, at build time)."""
        digest = hashlib.sha1()
        names = [Path(shard).name for shard in shards]
        for key, shard, frames, tokens in zip(keys, shard_ids.tolist(), latent_frames.tolist(),
                                              tokens_per_frame.tolist()):
            digest.update(_entry_line(key, names[shard], frames, tokens))
        encoded = np.array([key.encode("utf-8") for key in keys], dtype=np.bytes_) if len(keys) else \
            np.zeros(0, dtype="S1")
        columns = {"key": encoded}
        for name, values in zip(_COLUMNS, (shard_ids, episodes, latent_frames, tokens_per_frame, offsets, sizes)):
            columns[name] = np.asarray(values, dtype=_COLUMNS[name])
        return cls(columns, list(shards), digest.hexdigest()[:16], list(problems), stamps or {})

    def write(self, path: Path) -> None:
        """Write columns.idx atomically (readers see the old table or the new one)."""
        count = len(self)
        header = {"version": TABLE_VERSION, "count": count, "fingerprint": self.fingerprint,
                  "shards": self.shards, "problems": [list(p) for p in self.problems], "jsonl": self.stamps,
                  "columns": {}}
        # The header holds the column offsets, which depend on the header's length: lay it out
        # with placeholder offsets wide enough for any value, then fill them in.
        offsets = {name: 10 ** 15 for name in self.columns}
        header["columns"] = {name: {"dtype": self.columns[name].dtype.str, "offset": offsets[name]}
                             for name in self.columns}
        start = _round_up(len(MAGIC) + 8 + len(json.dumps(header).encode()), _ALIGN)
        for name, column in self.columns.items():
            header["columns"][name]["offset"] = start
            start = _round_up(start + column.nbytes, _ALIGN)
        text = json.dumps(header).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(MAGIC + len(text).to_bytes(8, "little") + text)
            for name, column in self.columns.items():
                handle.seek(header["columns"][name]["offset"])
                handle.write(np.ascontiguousarray(column).tobytes())
            handle.truncate(start)
        os.replace(tmp, path)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _corrupt(path: Path, reason: str) -> UserError:
    return UserError(f"data: {path} is not a valid index table ({reason}); rebuild it with "
                     f"`lbva data index {path.parent.parent.parent}`")


def open_table(path: Path) -> IndexTable:
    """Memory-map columns.idx; UserError naming the file when it is damaged."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise _corrupt(path, "it does not start with the index table's magic bytes")
        length = int.from_bytes(head[len(MAGIC):], "little")
        if length > size - len(head):
            raise _corrupt(path, f"its header claims {length} bytes, the file has {size}")
        try:
            header = json.loads(handle.read(length))
            count, columns = int(header["count"]), header["columns"]
            shards, fingerprint = list(header["shards"]), str(header["fingerprint"])
            problems = [tuple(str(field) for field in p) for p in header["problems"]]
            stamps = {str(k): [int(v[0]), int(v[1])] for k, v in header["jsonl"].items()}
            version = header["version"]
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
            raise _corrupt(path, f"unreadable header: {type(error).__name__}: {error}") from error
    if version != TABLE_VERSION:
        raise _corrupt(path, f"version {version}, this code reads {TABLE_VERSION}")
    missing = sorted({"key", *_COLUMNS} - set(columns))
    if missing:
        raise _corrupt(path, f"no column {', '.join(missing)}")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    arrays: dict[str, np.ndarray] = {}
    for name in ("key", *_COLUMNS):
        try:
            dtype, offset = np.dtype(columns[name]["dtype"]), int(columns[name]["offset"])
        except (TypeError, KeyError, ValueError) as error:
            raise _corrupt(path, f"column {name}: {type(error).__name__}: {error}") from error
        expected = "S" if name == "key" else np.dtype(_COLUMNS[name]).kind
        if dtype.kind != expected or (name != "key" and dtype != np.dtype(_COLUMNS[name])):
            raise _corrupt(path, f"column {name} has type {dtype}")
        end = offset + count * dtype.itemsize
        if offset < 0 or offset % _ALIGN or end > size:
            raise _corrupt(path, f"column {name} runs past the end of the file ({end} > {size} bytes)")
        arrays[name] = raw[offset:end].view(dtype)
    if count and (arrays["latent_frames"].min() < 1 or arrays["tokens_per_frame"].min() < 1
                  or arrays["shard"].min() < 0 or arrays["shard"].max() >= len(shards)):
        raise _corrupt(path, "frame counts, token counts or shard numbers out of range")
    return IndexTable(arrays, shards, fingerprint, problems, stamps, path)


def _parse_line(line: str, source: str) -> tuple[str, str, int, int, int, int, int]:
    """An index line: key, source, shard (relative to the dataset folder), episode, frames (latent
    frames), tokens (frames x tokens per frame) and, when prepare recorded it, the byte range."""
    row = json.loads(line)
    frames, tokens = int(row["frames"]), int(row["tokens"])
    if frames < 1 or tokens < frames or tokens % frames:
        raise ValueError(f"frames {frames} and tokens {tokens}: tokens must be a positive multiple of frames")
    if str(row["source"]) != source:
        raise ValueError(f"source '{row['source']}' in the index of source '{source}'")
    offset, size = int(row.get("offset", -1)), int(row.get("size", -1))
    return str(row["key"]), str(row["shard"]), int(row.get("episode", -1)), frames, tokens // frames, offset, size


def table_from_jsonl(root: Path, source: str, *, scan_shards: bool = False) -> IndexTable:
    """Parse every jsonl line of a source into a table. scan_shards: fill the byte ranges that the
    lines lack (datasets prepared before prepare recorded them) from the shards' tar headers."""
    root = Path(root)
    files = _jsonl_files(root, source)
    stamps = _jsonl_stamps(files)
    problems: list[Problem] = []
    keys, shard_ids, values = [], [], []
    shard_numbers: dict[str, int] = {}
    seen: set[str] = set()
    for index_file in files:
        for number, line in enumerate(index_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                key, shard, episode, frames, tokens_per_frame, offset, size = _parse_line(line, source)
            except (ValueError, KeyError, TypeError) as error:
                problems.append(("bad_index_line", "?", f"{index_file}:{number}", f"{type(error).__name__}: {error}"))
                continue
            if key in seen:
                problems.append(("duplicate_key", key, str(root / shard), f"listed twice in {index_file}"))
                continue
            seen.add(key)
            keys.append(key)
            shard_ids.append(shard_numbers.setdefault(shard, len(shard_numbers)))
            values.append((episode, frames, tokens_per_frame, offset, size))
    table = np.array(values, dtype=np.int64).reshape(-1, 5)
    shard_ids = np.array(shard_ids, dtype=np.int64)
    if scan_shards:
        _fill_byte_ranges(root, list(shard_numbers), keys, shard_ids, table)
    return IndexTable.from_rows(keys, list(shard_numbers), shard_ids, *table.T, problems=problems, stamps=stamps)


def sample_ranges(shard: Path) -> dict[str, tuple[int, int]]:
    """key -> [first byte, end byte) of each sample in a webdataset tar (its members are consecutive),
    from the tar headers alone; raises OSError / tarfile.TarError on a damaged tar."""
    ranges: dict[str, tuple[int, int]] = {}
    with tarfile.open(shard, mode="r:") as tar:
        for info in tar:
            key = info.name.split(".", 1)[0]
            start = ranges[key][0] if key in ranges else info.offset
            ranges[key] = (start, info.offset_data + _round_up(info.size, tarfile.BLOCKSIZE))
    return ranges


def _fill_byte_ranges(root: Path, shards: list[str], keys: list[str], shard_ids: np.ndarray,
                      table: np.ndarray) -> None:
    for number, shard in enumerate(shards):
        rows = np.flatnonzero((shard_ids == number) & (table[:, 3] < 0))
        if not len(rows):
            continue
        try:
            ranges = sample_ranges(root / shard)
        except (OSError, tarfile.TarError) as error:
            log.warning("%s: %s; its samples keep no byte range", root / shard, error)
            continue
        for row in rows:
            if keys[row] in ranges:
                table[row, 3], end = ranges[keys[row]]
                table[row, 4] = end - table[row, 3]


def build_table(root: Path, source: str, *, scan_shards: bool = False) -> IndexTable:
    """Rebuild OUT/index/{source}/columns.idx from the source's jsonl lines and write it.

    Holds a lock on the source's index folder while reading and writing, so that of several prepare
    tasks finishing together the last to write has seen every task's lines."""
    path = table_path(root, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".columns.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = table_from_jsonl(root, source, scan_shards=scan_shards)
        table.write(path)
    return table


def read_table(root: Path, source: str) -> IndexTable:
    """The source's table: columns.idx when it is there and up to date, else parsed from the jsonl."""
    path = table_path(root, source)
    if path.is_file():
        table = open_table(path)
        if table.stamps == _jsonl_stamps(_jsonl_files(root, source)):
            return table
        log.warning("%s is older than the jsonl lines of index/%s/; reading those instead (slow for large "
                    "sources): run `lbva data index %s` to rebuild it", path, source, root)
    else:
        log.info("%s has no %s; parsing its jsonl lines (run `lbva data index %s` to make start-up fast)",
                 path.parent, TABLE_NAME, root)
    return table_from_jsonl(root, source)


class _Entries(Sequence):
    """source.entries: the IndexEntry of each position, built when asked for."""

    def __init__(self, source: SourceIndex):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self._source.entry(i) for i in range(*position.indices(len(self)))]
        return self._source.entry(position)

    def __iter__(self) -> Iterator[IndexEntry]:
        return (self._source.entry(i) for i in range(len(self)))


class SourceIndex:
    """The samples of one source, in index order: a view of the rows `rows` of an IndexTable
    (all rows when None). Everything per sample is built on demand, so a source of millions of
    samples costs its memory-mapped columns, not millions of Python objects.

    name, root (the dataset folder), fingerprint (hashes key, shard name, latent frames and tokens
    per frame of every entry, in order). len(source); source.entry(i); source.entries (a read-only
    Sequence of IndexEntry); source.episodes ([len] int64); source.keys(positions);
    source.subset(positions, tag).
    """

    def __init__(self, name: str, root: Path, table: IndexTable, rows: np.ndarray | None = None,
                 fingerprint: str | None = None):
        self.name, self.root, self.table = name, Path(root), table
        self.rows = rows
        self.fingerprint = fingerprint or table.fingerprint

    def __len__(self) -> int:
        return len(self.table) if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return f"SourceIndex({self.name!r}, {str(self.root)!r}, {len(self)} entries, {self.fingerprint})"

    def _row(self, position: int) -> int:
        if not -len(self) <= position < len(self):
            raise IndexError(f"position {position} outside source {self.name} of {len(self)} entries")
        return int(position if self.rows is None else self.rows[position]) % len(self.table)

    def _column(self, name: str) -> np.ndarray:
        column = self.table.columns[name]
        return column if self.rows is None else column[self.rows]

    def entry(self, position: int) -> IndexEntry:
        row = self._row(position)
        c = self.table.columns
        offset, size = int(c["offset"][row]), int(c["size"][row])
        return IndexEntry(
            key=c["key"][row].decode("utf-8"), source=self.name, shard=self.root / self.table.shards[c["shard"][row]],
            latent_frames=int(c["latent_frames"][row]), tokens_per_frame=int(c["tokens_per_frame"][row]),
            episode=int(c["episode"][row]), byte_range=(offset, offset + size) if offset >= 0 else None,
        )

    @property
    def entries(self) -> Sequence[IndexEntry]:
        return _Entries(self)

    @property
    def episodes(self) -> np.ndarray:
        """[len] int64: the episode number of each entry, in index order."""
        return np.asarray(self._column("episode"), dtype=np.int64)

    def keys(self, positions) -> list[str]:
        rows = np.asarray(positions, dtype=np.int64)
        if self.rows is not None:
            rows = self.rows[rows]
        return [key.decode("utf-8") for key in self.table.columns["key"][rows].tolist()]

    def widest(self) -> IndexEntry:
        """The first entry with the most tokens per frame."""
        return self.entry(int(np.argmax(self._column("tokens_per_frame"))))

    def subset(self, positions: np.ndarray, tag: str) -> SourceIndex:
        """The entries at `positions` (of this source), in that order. Its fingerprint is derived from
        this one's, the tag and the positions, so plans over different subsets never share a state."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside source {self.name} of {len(self)} entries")
        rows = positions if self.rows is None else self.rows[positions]
        digest = hashlib.sha1(f"{self.fingerprint}\t{tag}\t".encode())
        digest.update(positions.astype("<i8").tobytes())
        return SourceIndex(self.name, self.root, self.table, rows, digest.hexdigest()[:16])
