"""Writing the prepared folder of format.py so that readers never see a partial file.

Shards are written as .tar.tmp by webdataset's ShardWriter and renamed to .tar when complete; every
other file (index, texts, stats, card) is written to a temporary name and renamed over the old one.
The card is updated under a file lock, since the array tasks of several sources share it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path

import webdataset as wds

from lbva.training.data.format import FORMAT_VERSION, SampleMeta
from lbva.training.data.index import sample_ranges
from lbva.errors import UserError

VERSIONED_PACKAGES = ("lingbot-va-pretrain", "torch", "diffusers", "transformers", "webdataset", "numpy",
                      "pyarrow", "av", "safetensors")


def shard_path(out: Path, source: str, task: int, number: int) -> Path:
    return out / "shards" / source / f"t{task:03d}-{number:05d}.tar"


def index_path(out: Path, source: str, task: int) -> Path:
    return out / "index" / source / f"t{task:03d}.jsonl"


def texts_path(out: Path, source: str, task: int) -> Path:
    return out / "texts" / source / f"t{task:03d}.safetensors"


def stats_path(out: Path, source: str) -> Path:
    return out / "stats" / f"{source}.json"


def temporary_path(path: Path) -> Path:
    """A name next to `path` for writing it before the rename, unique to this process."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def out_of_space(error: OSError, path: Path) -> UserError | None:
    """The one line for a full disk or quota while writing `path`, or None for any other OSError."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return UserError(f"{path}: no space left on its file system ({os.strerror(error.errno)}); nothing partial "
                     "was kept; free space or prepare elsewhere, then rerun: finished shards are kept")


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a half-written one (also on a full disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise out_of_space(error, path) or error


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _without_paths(encoders: dict) -> dict:
    # The same weights may be mounted under another path on another node.
    return {part: {k: v for k, v in value.items() if not k.endswith("path")} if isinstance(value, dict) else value
            for part, value in encoders.items()}


def update_card(out: Path, source: str, encoders: dict, entry: dict) -> None:
    """Add `source`'s entry to OUT/card.json, or check it against the recorded one.

    card.json: {"format_version", "encoders" (EncoderChoice.describe()), "sources": {name: entry},
    "versions" (of the last writer)}. Raises UserError when the recorded encoders (paths aside) or
    this source's recorded settings differ: data prepared both ways would mix in one folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "card.json"
    with open(out / ".card.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        card = json.loads(path.read_text()) if path.is_file() else {
            "format_version": FORMAT_VERSION, "encoders": encoders, "sources": {}}
        if card.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path} has format_version {card.get('format_version')}, this code writes "
                            f"{FORMAT_VERSION}; prepare into a new folder")
        if _without_paths(card["encoders"]) != _without_paths(encoders):
            raise UserError(f"{path} was prepared with other encoders ({card['encoders']['kind']}); latents and "
                            "text embeddings from different encoders cannot be mixed; prepare into a new folder")
        previous = card["sources"].get(source)
        if previous is not None and previous != entry:
            changed = sorted(key for key in entry.keys() | previous.keys() if entry.get(key) != previous.get(key))
            raise UserError(f"{path}: source '{source}' was prepared with other settings ({', '.join(changed)}); "
                            "rerun with the same settings or prepare into a new folder")
        card["sources"][source] = entry
        card["versions"] = _versions()
        write_atomic(path, json.dumps(card, indent=1).encode())


def index_line(meta: SampleMeta, shard: str, byte_range: tuple[int, int]) -> str:
    """One index line; `shard` is relative to OUT, `tokens` counts one copy of all latent frames and
    offset/size give the sample's bytes in the shard tar (so a reader seeks straight to it)."""
    return json.dumps({"key": meta.key, "source": meta.source, "shard": shard, "episode": meta.episode,
                       "frames": meta.latent_frames, "tokens": meta.latent_frames * meta.tokens_per_frame,
                       "offset": byte_range[0], "size": byte_range[1] - byte_range[0]})


def shard_lines(out: Path, shard: str, metas: list[SampleMeta]) -> list[str]:
    """The index lines of a committed shard's samples, with their byte ranges read from its tar headers."""
    ranges = sample_ranges(out / shard)
    return [index_line(meta, shard, ranges[meta.key]) for meta in metas]


class TaskIndex:
    """OUT/index/{source}/t{task}.jsonl, rewritten atomically so lines appear only for committed shards."""

    def __init__(self, path: Path, out: Path) -> None:
        self.path, self.out = path, out
        self.lines: dict[str, list[str]] = {}  # shard (relative to OUT) -> its lines
        if path.is_file():
            for line in path.read_text().splitlines():
                self.lines.setdefault(json.loads(line)["shard"], []).append(line)

    def repair(self, finished: list[str]) -> None:
        """Make the index list exactly the finished shards: lines of vanished shards go, and the lines of
        shards committed just before a crash (between rename and index write) are rebuilt from the shard."""
        stale = set(self.lines) - set(finished)
        missing = [shard for shard in finished if shard not in self.lines]
        for shard in stale:
            del self.lines[shard]
        for shard in missing:
            with tarfile.open(self.out / shard) as tar:
                metas = [SampleMeta(**json.load(tar.extractfile(member)))
                         for member in tar.getmembers() if member.name.endswith(".meta.json")]
            self.lines[shard] = shard_lines(self.out, shard, metas)
        if stale or missing:
            self._write()

    def add(self, shard: str, lines: list[str]) -> None:
        self.lines[shard] = lines
        self._write()

    def _write(self) -> None:
        text = "".join(line + "\n" for shard in sorted(self.lines) for line in self.lines[shard])
        write_atomic(self.path, text.encode())


def _commit(tmp_name: str) -> None:
    """ShardWriter's `post`: make the closed shard durable, then visible under its final name."""
    with open(tmp_name, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_name, tmp_name.removesuffix(".tmp"))


@contextmanager
def committed_shard(directory: Path, task: int, number: int) -> Iterator[wds.ShardWriter]:
    """A ShardWriter for exactly shard `number` of `task`: written as .tar.tmp, renamed to .tar when the
    block ends normally; when the block raises, the partial file is deleted and nothing becomes visible."""
    writer = wds.ShardWriter(str(directory / f"t{task:03d}-%05d.tar.tmp"), maxcount=sys.maxsize,
                             maxsize=float("inf"), post=_commit, start_shard=number, verbose=0)
    try:
        yield writer
        writer.close()
    except BaseException as error:
        writer.post = None
        with suppress(OSError):  # closing a shard on a full disk fails again
            writer.close()
        Path(writer.fname).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise out_of_space(error, Path(writer.fname.removesuffix(".tmp"))) or error
        raise
