"""Reading a prepared dataset (format.py): the index, the text embeddings and the samples in the
shards, with every problem found turned into a `BadRecord` that names the shard and the key.

Samples are read by random access, not by streaming a tar front to back: the training order is a
global permutation over all samples (plan.py), so the reader keeps, per shard, the byte range of
each sample (its members are consecutive in the tar), found once from the tar headers.
"""

from __future__ import annotations

import io
import json
import logging
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

from .format import EMPTY_TEXT_ID, decode_members
from .samples import EpisodeSample

log = logging.getLogger("lbva.data")

OnError = Literal["skip", "fail"]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of an index file: what the plan needs to know about a sample without reading it."""

    key: str
    source: str
    shard: Path
    latent_frames: int
    tokens_per_frame: int  # video + action tokens of one copy of one latent frame

    @property
    def num_frames(self) -> int:
        """The name `packing.cut_windows` reads, so windows are cut from the index alone."""
        return self.latent_frames


@dataclass
class SourceIndex:
    name: str
    root: Path  # the dataset folder that holds this source
    entries: list[IndexEntry]


@dataclass(frozen=True)
class BadRecord:
    """One problem with the data: what kind, which sample (or '*' for a whole shard) and where."""

    kind: str  # missing_index, bad_index_line, duplicate_key, unreadable_shard, missing_sample,
    # truncated, undecodable, length_mismatch, index_mismatch, non_finite, missing_text
    key: str
    shard: str
    detail: str

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


def _parse_entry(line: str, root: Path, source: str) -> IndexEntry:
    """An index line: key, source, shard (relative to the dataset folder), episode, frames (latent
    frames) and tokens (frames x tokens per frame)."""
    row = json.loads(line)
    frames, tokens = int(row["frames"]), int(row["tokens"])
    if frames < 1 or tokens < frames or tokens % frames:
        raise ValueError(f"frames {frames} and tokens {tokens}: tokens must be a positive multiple of frames")
    entry = IndexEntry(
        key=str(row["key"]), source=str(row["source"]), shard=root / str(row["shard"]),
        latent_frames=frames, tokens_per_frame=tokens // frames,
    )
    if entry.source != source:
        raise ValueError(f"source '{entry.source}' in the index of source '{source}'")
    return entry


def _read_source(root: Path, source: str, on_error: OnError) -> tuple[SourceIndex, list[BadRecord]]:
    problems: list[BadRecord] = []

    def problem(record: BadRecord) -> None:
        report_bad(record, on_error)
        problems.append(record)

    entries: list[IndexEntry] = []
    seen: set[str] = set()
    for index_file in sorted((root / "index" / source).glob("t*.jsonl")):
        for number, line in enumerate(index_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = _parse_entry(line, root, source)
            except (ValueError, KeyError, TypeError) as error:
                problem(BadRecord("bad_index_line", "?", f"{index_file}:{number}", f"{type(error).__name__}: {error}"))
                continue
            if entry.key in seen:
                problem(BadRecord("duplicate_key", entry.key, str(entry.shard), f"listed twice in {index_file}"))
                continue
            seen.add(entry.key)
            entries.append(entry)
    # A committed shard that no index line names (its task's index is missing, or prepare stopped
    # between committing the shard and writing its lines) is never read: say so.
    indexed = {entry.shard for entry in entries}
    for shard in sorted((root / "shards" / source).glob("t*-*.tar")):
        if shard not in indexed:
            problem(BadRecord("missing_index", "*", str(shard), f"no line of index/{source}/ names this shard"))
    return SourceIndex(source, root, entries), problems


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
            if source.entries:
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
        if stored.ndim != 2 or stored.shape[0] > self.text_tokens:
            raise BadSample("undecodable", f"text embedding '{text_id}' has shape {tuple(stored.shape)}, "
                            f"expected [<= {self.text_tokens}, text_dim]")
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


class ShardReader:
    """Random access to the samples of webdataset tars by key.

    The first read from a shard scans its tar headers (seeks only, no member data) into a table
    key -> (first byte, end byte); a sample is then one read of its byte range. A table costs
    about 150 bytes per sample and is kept for the reader's life.
    """

    def __init__(self) -> None:
        self._tables: dict[Path, dict[str, tuple[int, int]] | str] = {}  # a str: why it is unreadable

    def _scan(self, shard: Path) -> dict[str, tuple[int, int]] | str:
        table: dict[str, tuple[int, int]] = {}
        try:
            tar = tarfile.open(shard, mode="r:")
        except (OSError, tarfile.TarError) as error:
            return f"{type(error).__name__}: {error}"
        with tar:
            while True:
                try:
                    info = tar.next()
                except (OSError, tarfile.TarError):
                    # A cut or damaged tar: what was listed before stays readable; the samples
                    # after it are reported one by one (truncated / missing) when they are read.
                    break
                if info is None:
                    break
                key = info.name.split(".", 1)[0]
                start = table[key][0] if key in table else info.offset
                # Member data is padded to whole tar blocks; the range ends at the padding's end.
                table[key] = (start, info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
        return table

    def read(self, shard: Path, key: str) -> dict[str, bytes]:
        """The sample's members by name ('latents.npy', ...) plus '__key__'; BadSample on failure."""
        if shard not in self._tables:
            self._tables[shard] = self._scan(shard)
        table = self._tables[shard]
        if isinstance(table, str):
            raise BadSample("unreadable_shard", table)
        if key not in table:
            raise BadSample("missing_sample", "not in the shard (or behind a damaged tar header)")
        start, end = table[key]
        with open(shard, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        if len(data) < end - start:
            raise BadSample("truncated", f"the shard ends {end - start - len(data)} bytes into this sample")
        members: dict[str, bytes] = {"__key__": key}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    members[info.name.split(".", 1)[1]] = tar.extractfile(info).read()
        except (tarfile.TarError, IndexError, AttributeError) as error:
            raise BadSample("undecodable", f"tar members: {type(error).__name__}: {error}") from error
        return members


# -------------------------------------------------------------------------------------- samples


class SampleReader:
    """Index entry -> EpisodeSample (float32 latents, padded text), checked against the index."""

    def __init__(self, sources: Sequence[SourceIndex], *, text_tokens: int, latent_channels: int,
                 patch: tuple[int, int, int]):
        self.texts = TextStore(sources, text_tokens)
        self.shards = ShardReader()
        self.latent_channels = latent_channels
        self.patch = patch

    def load(self, entry: IndexEntry) -> EpisodeSample:
        """Raises BadSample with the reason when the sample is unreadable or inconsistent."""
        members = self.shards.read(entry.shard, entry.key)
        try:
            latents, actions, action_mask, meta = decode_members(members)
        except (KeyError, ValueError, TypeError, EOFError) as error:
            raise BadSample("undecodable", f"{type(error).__name__}: {error}") from error
        self._check(entry, latents, actions, action_mask, meta.key)
        return EpisodeSample(
            key=entry.key,
            source=entry.source,
            latents=torch.from_numpy(latents.astype(np.float32)),
            actions=torch.from_numpy(actions.astype(np.float32)),
            action_mask=torch.from_numpy(action_mask.astype(bool)),
            text_emb=self.texts.get(entry.source, meta.text_id),
        )

    def _check(self, entry: IndexEntry, latents, actions, action_mask, meta_key: str) -> None:
        if meta_key != entry.key:
            raise BadSample("index_mismatch", f"meta.json names sample {meta_key}")
        if latents.ndim != 4 or latents.shape[0] != self.latent_channels:
            raise BadSample("undecodable", f"latents {latents.shape}, expected [{self.latent_channels}, F, h, w]")
        if actions.ndim != 3 or actions.shape[0] != ACTION_DIM or action_mask.shape != (ACTION_DIM,):
            raise BadSample("undecodable", f"actions {actions.shape} / action_mask {action_mask.shape}, "
                            f"expected [{ACTION_DIM}, F, N] / [{ACTION_DIM}]")
        frames = latents.shape[1]
        if actions.shape[1] != frames:
            raise BadSample("length_mismatch", f"latents have {frames} frames, actions {actions.shape[1]}")
        if frames != entry.latent_frames:
            raise BadSample("index_mismatch", f"index says {entry.latent_frames} latent frames, shard has {frames}")
        video_tokens = (latents.shape[2] // self.patch[1]) * (latents.shape[3] // self.patch[2])
        if video_tokens + actions.shape[2] != entry.tokens_per_frame:
            raise BadSample("index_mismatch", f"index says {entry.tokens_per_frame} tokens per frame, shard has "
                            f"{video_tokens} video + {actions.shape[2]} action tokens at patch {self.patch}")
        if not np.isfinite(latents).all():
            raise BadSample("non_finite", "NaN or inf in latents")
        if not np.isfinite(actions).all():
            raise BadSample("non_finite", "NaN or inf in actions")
