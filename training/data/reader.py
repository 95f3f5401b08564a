"""Reading a prepared dataset (format.py): the index, the text embeddings and the samples in the
shards, with every problem found turned into a `BadRecord` that names the shard and the key.

Samples are read by random access, not by streaming a tar front to back: the training order is a
global permutation over all samples (plan.py). The index records each sample's byte range in its
shard (index.py); the reader walks the few tar headers in it and reads, of the latents and actions,
only the frames a window needs (npy members: C-order [C, F, h, w] and [30, F, N], so one contiguous
range per channel).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import safe_open

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM

from .format import EMPTY_TEXT_ID, MEMBERS, SampleMeta
from .index import IndexEntry, SourceIndex, read_table
from .samples import EpisodeSample

log = logging.getLogger("lbva.data")

OnError = Literal["skip", "fail"]


@dataclass(frozen=True)
class BadRecord:
    """One problem with the data: what kind, which sample (or '*' for a whole shard) and where."""

    kind: str  # missing_index, bad_index_line, duplicate_key, unreadable_shard, missing_sample,
    # truncated, undecodable, bad_shape, length_mismatch, index_mismatch, non_finite, missing_text
    key: str
    shard: str
    detail: str
    source: str = ""

    def message(self) -> str:
        return f"{self.kind}: sample {self.key} in {self.shard}: {self.detail}"


class DataError(UserError):
    """Bad data under on_error='fail'."""


class BadSample(Exception):
    """A sample that cannot be used; the loader turns it into a BadRecord."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def report_bad(record: BadRecord, on_error: OnError) -> None:
    """Log a problem, or raise it as a DataError under on_error='fail'."""
    if on_error == "fail":
        raise DataError(f"{record.message()} (set data.on_error = 'skip' to skip bad samples)")
    log.warning("skipping bad data: %s", record.message())


# ---------------------------------------------------------------------------------------- index


def _read_source(root: Path, source: str, on_error: OnError) -> tuple[SourceIndex, list[BadRecord]]:
    problems: list[BadRecord] = []

    def problem(record: BadRecord) -> None:
        report_bad(record, on_error)
        problems.append(record)

    table = read_table(root, source)
    for found in table.problems:
        problem(BadRecord(*found, source=source))
    # A committed shard that no index line names (its task's index is missing, or prepare stopped
    # between committing the shard and writing its lines) is never read: say so.
    indexed = {root / shard for shard in table.shards}
    for shard in sorted((root / "shards" / source).glob("t*-*.tar")):
        if shard not in indexed:
            problem(BadRecord("missing_index", "*", str(shard), f"no line of index/{source}/ names this shard",
                              source))
    return SourceIndex(source, root, table), problems


def read_index(datasets: Sequence[Path], on_error: OnError) -> tuple[list[SourceIndex], list[BadRecord]]:
    """Every source of every dataset folder, sorted by name, with the problems found (logged, or
    raised as DataError under on_error='fail'). A source with no usable entry is left out."""
    sources: dict[str, SourceIndex] = {}
    problems: list[BadRecord] = []
    for root in map(Path, datasets):
        if not (root / "index").is_dir() and not (root / "shards").is_dir():
            raise UserError(f"data: {root} is not a prepared dataset (no index/ or shards/); run `lbva data prepare`")
        folders = [root / folder for folder in ("index", "shards") if (root / folder).is_dir()]
        names = {p.name for folder in folders for p in folder.iterdir() if p.is_dir()}
        for name in sorted(names):
            if name in sources:
                raise UserError(f"data: source '{name}' is in both {sources[name].root} and {root}; rename one")
            source, found = _read_source(root, name, on_error)
            problems += found
            if len(source):
                sources[name] = source
            else:
                log.warning("source %s in %s has no usable sample; it is left out", name, root)
    if not sources:
        raise UserError(f"data: no usable sample in {', '.join(map(str, datasets))}")
    return [sources[name] for name in sorted(sources)], problems


# ---------------------------------------------------------------------------------------- texts


class TextStore:
    """Text embeddings by text id, stored at their true length (format.py) and zero-padded to
    `text_tokens` when read. Files are opened lazily; only their headers are read up front."""

    def __init__(self, sources: Sequence[SourceIndex], text_tokens: int):
        self.text_tokens = text_tokens
        self._roots = {s.name: s.root for s in sources}
        self._files: dict[str, dict[str, Path]] = {}  # source -> text id -> file

    def _ids(self, source: str) -> dict[str, Path]:
        if source not in self._files:
            ids: dict[str, Path] = {}
            for path in sorted((self._roots[source] / "texts" / source).glob("*.safetensors")):
                with safe_open(path, framework="pt") as handle:
                    ids.update(dict.fromkeys(handle.keys(), path))
            self._files[source] = ids
        return self._files[source]

    def get(self, source: str, text_id: str) -> torch.Tensor:
        """[text_tokens, text_dim] float32, zero past the stored length; BadSample if absent."""
        path = self._ids(source).get(text_id)
        if path is None:
            raise BadSample("missing_text", f"no text embedding '{text_id}' in texts/{source}/")
        with safe_open(path, framework="pt") as handle:
            stored = handle.get_tensor(text_id)
        if stored.ndim != 2 or stored.shape[0] > self.text_tokens or not stored.is_floating_point():
            raise BadSample("undecodable", f"text embedding '{text_id}' is {stored.dtype} {tuple(stored.shape)}, "
                            f"expected floating point [<= {self.text_tokens}, text_dim]")
        if not bool(torch.isfinite(stored).all()):
            raise BadSample("non_finite", f"NaN or inf in text embedding '{text_id}'")
        padded = torch.zeros(self.text_tokens, stored.shape[1])
        padded[: stored.shape[0]] = stored.float()
        return padded

    def empty_text(self) -> torch.Tensor:
        """The encoding of "" (CFG text dropout), from the first source that stores it."""
        for source in sorted(self._roots):
            if EMPTY_TEXT_ID in self._ids(source):
                return self.get(source, EMPTY_TEXT_ID)
        raise UserError(
            f"data: no empty-text embedding ('{EMPTY_TEXT_ID}') in texts/*/ of any source; "
            "re-run `lbva data prepare`, which stores it"
        )


# --------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Member:
    """A tar member's data: where it starts in the shard and how many bytes it has."""

    offset: int
    size: int


class _Counted:
    """A file object that adds the bytes read through it to its ShardReader's count."""

    def __init__(self, handle, reader: ShardReader):
        self.handle, self.reader = handle, reader

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.reader.bytes_read += len(data)
        return data

    def seek(self, *args) -> int:
        return self.handle.seek(*args)

    def tell(self) -> int:
        return self.handle.tell()


class ShardReader:
    """Random access to the members of samples in webdataset tars, reading only what is asked for.

    A sample's members (consecutive in the tar) are found from their tar headers: starting at the
    byte range the index records, a few header reads; for an index without byte ranges (built from
    jsonl lines written before prepare recorded them), from a scan of the whole shard's headers, done
    on the first read from that shard and kept for the reader's life (a few hundred bytes a sample).
    `bytes_read` counts every byte asked of the file system, headers included.
    """

    def __init__(self) -> None:
        self._scans: dict[Path, tuple[dict[str, dict[str, Member]], bool] | str] = {}  # str: why unreadable
        self.bytes_read = 0

    def open_sample(self, entry: IndexEntry) -> SampleFile:
        """The sample's members in its open shard (close it, or use it as a context manager)."""
        try:
            handle = open(entry.shard, "rb", buffering=0)
        except OSError as error:
            raise BadSample("unreadable_shard", f"{type(error).__name__}: {error}") from error
        try:
            if entry.byte_range is None:
                members = self._scanned(entry.shard, entry.key)
            else:
                members = self._walk(handle, entry.key, *entry.byte_range)
        except BaseException:
            handle.close()
            raise
        return SampleFile(handle, entry.key, members, self)

    def _walk(self, handle, key: str, start: int, end: int) -> dict[str, Member]:
        size = os.fstat(handle.fileno()).st_size
        if size < end:
            raise BadSample("truncated", f"the shard ends {end - size} bytes into this sample")
        handle.seek(start)
        members: dict[str, Member] = {}
        try:
            tar = tarfile.TarFile(fileobj=_Counted(handle, self), mode="r")
            info = tar.firstmember
            while info is not None and info.offset < end:
                name_key, _, name = info.name.partition(".")
                if name_key != key:
                    raise BadSample("index_mismatch", f"the index's byte range {start}-{end} holds {info.name}")
                members[name] = Member(info.offset_data, info.size)
                info = tar.next() if tar.offset < end else None
        except (tarfile.TarError, OSError) as error:
            raise BadSample("undecodable", f"tar headers: {type(error).__name__}: {error}") from error
        return members

    def _scanned(self, shard: Path, key: str) -> dict[str, Member]:
        if shard not in self._scans:
            self._scans[shard] = self._scan(shard)
        scan = self._scans[shard]
        if isinstance(scan, str):
            raise BadSample("unreadable_shard", scan)
        table, damaged = scan
        if key not in table:
            raise BadSample("missing_sample", "not in the shard (or behind a damaged tar header)")
        members = table[key]
        if damaged and key == next(reversed(table)) and set(MEMBERS) - set(members):
            raise BadSample("truncated", "the shard's tar ends inside this sample")
        return members

    def _scan(self, shard: Path) -> tuple[dict[str, dict[str, Member]], bool] | str:
        table: dict[str, dict[str, Member]] = {}
        try:
            handle = open(shard, "rb")
        except OSError as error:
            return f"{type(error).__name__}: {error}"
        try:
            tar = tarfile.TarFile(fileobj=_Counted(handle, self), mode="r")
        except (OSError, tarfile.TarError) as error:
            handle.close()
            return f"{type(error).__name__}: {error}"
        damaged = False
        with handle, tar:
            while True:
                try:
                    info = tar.next()
                except (OSError, tarfile.TarError):
                    # A cut or damaged tar: what was listed before stays readable; the samples
                    # after it are reported one by one (truncated / missing) when they are read.
                    damaged = True
                    break
                if info is None:
                    break
                key, _, name = info.name.partition(".")
                table.setdefault(key, {})[name] = Member(info.offset_data, info.size)
        return table, damaged


class SampleFile:
    """One sample's members in its open shard: whole members, npy headers, and frame ranges."""

    def __init__(self, handle, key: str, members: dict[str, Member], reader: ShardReader):
        self.handle, self.key, self.members, self.reader = handle, key, members, reader
        missing = [name for name in MEMBERS if name not in members]
        if missing:
            handle.close()
            raise BadSample("undecodable", f"sample {key} lacks {missing}")

    def __enter__(self) -> SampleFile:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def _pread_into(self, buffer: memoryview, offset: int) -> None:
        got = os.preadv(self.handle.fileno(), [buffer], offset)
        self.reader.bytes_read += got
        if got < len(buffer):
            raise BadSample("truncated", f"the shard ends {len(buffer) - got} bytes short of member data")

    def read(self, name: str) -> bytes:
        member = self.members[name]
        data = bytearray(member.size)
        self._pread_into(memoryview(data), member.offset)
        return bytes(data)

    def array_header(self, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
        """(shape, dtype, offset of the first data byte in the shard) of an .npy member."""
        member = self.members[name]
        head = bytearray(min(member.size, 128))
        self._pread_into(memoryview(head), member.offset)
        try:
            stream = io.BytesIO(bytes(head))
            version = np.lib.format.read_magic(stream)
            width = 2 if version == (1, 0) else 4
            length = len(np.lib.format.MAGIC_PREFIX) + 2 + width + int.from_bytes(head[8 : 8 + width], "little")
            if length > len(head):
                head = bytearray(min(length, member.size))
                self._pread_into(memoryview(head), member.offset)
                stream = io.BytesIO(bytes(head))
                np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"npy version {version}")
        except (ValueError, SyntaxError, TypeError, EOFError) as error:
            raise BadSample("undecodable", f"{name}: {type(error).__name__}: {error}") from error
        if fortran or dtype.hasobject:
            raise BadSample("undecodable", f"{name}: a Fortran-order or object array")
        if length + int(np.prod(shape)) * dtype.itemsize > member.size:
            raise BadSample("undecodable", f"{name}: {member.size} bytes, too few for shape {shape} {dtype}")
        return tuple(shape), dtype, member.offset + length

    def frames(self, name: str, header: tuple[tuple[int, ...], np.dtype, int], axis: int, start: int,
               count: int) -> np.ndarray:
        """Positions [start, start + count) along `axis` of an .npy member, reading only those bytes:
        one contiguous range per index of the axes before `axis`."""
        shape, dtype, data = header
        leading = int(np.prod(shape[:axis]))
        inner = int(np.prod(shape[axis + 1 :])) * dtype.itemsize
        out = np.empty(leading * count * inner, dtype=np.uint8)
        view, chunk = memoryview(out), count * inner
        for block in range(leading):
            self._pread_into(view[block * chunk : (block + 1) * chunk], data + (block * shape[axis] + start) * inner)
        return out.view(dtype).reshape(*shape[:axis], count, *shape[axis + 1 :])


# -------------------------------------------------------------------------------------- samples


class SampleReader:
    """Index entry (and a frame range) -> EpisodeSample (float32 latents, padded text), checked
    against the index: the shapes in the npy headers always, finiteness on the frames read."""

    def __init__(self, sources: Sequence[SourceIndex], *, text_tokens: int, latent_channels: int,
                 patch: tuple[int, int, int]):
        self.texts = TextStore(sources, text_tokens)
        self.shards = ShardReader()
        self.latent_channels = latent_channels
        self.patch = patch

    def load(self, entry: IndexEntry) -> EpisodeSample:
        """The whole sample; raises BadSample with the reason when it is unreadable or inconsistent."""
        return self.load_frames(entry, 0, entry.latent_frames)

    def load_frames(self, entry: IndexEntry, start: int, frames: int) -> EpisodeSample:
        """Latent frames [start, start + frames) of the sample and their action groups, reading only
        those bytes of the latents and actions: latents [C, frames, h, w], actions [30, frames, N]."""
        with self.shards.open_sample(entry) as sample:
            try:
                meta = SampleMeta(**json.loads(sample.read("meta.json")))
                action_mask = np.load(io.BytesIO(sample.read("action_mask.npy")), allow_pickle=False)
            except (KeyError, ValueError, TypeError, EOFError) as error:
                raise BadSample("undecodable", f"{type(error).__name__}: {error}") from error
            latents_header = sample.array_header("latents.npy")
            actions_header = sample.array_header("actions.npy")
            self._check(entry, latents_header, actions_header, action_mask, meta.key)
            if not 0 <= start < start + frames <= entry.latent_frames:
                raise ValueError(f"frames {start}..{start + frames} outside the {entry.latent_frames} of {entry.key}")
            latents = sample.frames("latents.npy", latents_header, 1, start, frames)
            actions = sample.frames("actions.npy", actions_header, 1, start, frames)
        if not np.isfinite(latents).all():
            raise BadSample("non_finite", "NaN or inf in latents")
        if not np.isfinite(actions).all():
            raise BadSample("non_finite", "NaN or inf in actions")
        text_emb = self.texts.get(entry.source, meta.text_id)
        if text_emb.shape != self.text_shape:
            raise BadSample("bad_shape", f"text embedding '{meta.text_id}' is {text_emb.shape[-1]} wide, the "
                            f"dataset's empty text {self.text_shape[-1]}")
        return EpisodeSample(
            key=entry.key,
            source=entry.source,
            latents=torch.from_numpy(latents.astype(np.float32)),
            actions=torch.from_numpy(actions.astype(np.float32)),
            action_mask=torch.from_numpy(action_mask.astype(bool)),
            text_emb=text_emb,
        )

    @functools.cached_property
    def text_shape(self) -> torch.Size:
        """[text_tokens, text_dim] of every text embedding: the empty text's (checked against the model)."""
        return self.texts.empty_text().shape

    def _check(self, entry: IndexEntry, latents_header: tuple, actions_header: tuple, action_mask: np.ndarray,
               meta_key: str) -> None:
        """The checks on the dtypes and shapes (from the npy headers) against the model and the index:
        whatever passes them packs and patchifies."""
        (latents, latents_dtype, _), (actions, actions_dtype, _) = latents_header, actions_header
        if meta_key != entry.key:
            raise BadSample("index_mismatch", f"meta.json names sample {meta_key}")
        # Complex values would be cast to real with only a warning, strings not at all.
        for name, dtype in (("latents", latents_dtype), ("actions", actions_dtype)):
            if dtype.kind != "f":
                raise BadSample("undecodable", f"{name} of dtype {dtype}, expected a floating-point type")
        if action_mask.dtype.kind not in "biu":
            raise BadSample("undecodable", f"action_mask of dtype {action_mask.dtype}, expected bool")
        mask_shape = action_mask.shape
        if len(latents) != 4 or latents[0] != self.latent_channels:
            raise BadSample("undecodable", f"latents {latents}, expected [{self.latent_channels}, F, h, w]")
        if len(actions) != 3 or actions[0] != ACTION_DIM or mask_shape != (ACTION_DIM,):
            raise BadSample("undecodable", f"actions {actions} / action_mask {mask_shape}, "
                            f"expected [{ACTION_DIM}, F, N] / [{ACTION_DIM}]")
        frames = latents[1]
        if actions[1] != frames:
            raise BadSample("length_mismatch", f"latents have {frames} frames, actions {actions[1]}")
        if frames != entry.latent_frames:
            raise BadSample("index_mismatch", f"index says {entry.latent_frames} latent frames, shard has {frames}")
        if latents[2] % self.patch[1] or latents[3] % self.patch[2] or not latents[2] or not latents[3]:
            raise BadSample("bad_shape", f"latents {latents}: height and width must be positive multiples of the "
                            f"patch {self.patch[1:]}")
        video_tokens = (latents[2] // self.patch[1]) * (latents[3] // self.patch[2])
        if video_tokens + actions[2] != entry.tokens_per_frame:
            raise BadSample("index_mismatch", f"index says {entry.tokens_per_frame} tokens per frame, shard has "
                            f"{video_tokens} video + {actions[2]} action tokens at patch {self.patch}")
