"""Sharded, asynchronous, atomically committed training checkpoints (torch.distributed.checkpoint).

Layout under a run directory:

    checkpoints/step_00001200/          committed: DCP shards + .metadata + lbva_meta.json
    checkpoints/step_00001300.partial/  being written (never read; removed on the next start)
    checkpoints/step_00001400.damaged/  failed verification at a resume, set aside (kept for a look)

A checkpoint becomes visible only by the rename of its `.partial` folder, done by rank 0 after
DCP's own metadata file exists, which DCP writes once every rank's shards are on disk. A crash at
any point therefore leaves the previous committed checkpoint as the newest.

`lbva_meta.json` records every file's size and SHA-256; `verify` compares them with the disk, and
resume, export and `lbva ckpt verify` all go through it. DCP's `.metadata` is a pickle: loading a
checkpoint runs its unpickling, so load only checkpoints from a trusted source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from lbva.errors import UserError

META_FILE = "lbva_meta.json"
FORMAT_VERSION = 1
_PREFIX, _PARTIAL, _DAMAGED = "step_", ".partial", ".damaged"
_COMMITTED_NAME = re.compile(rf"{_PREFIX}(\d+)")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: incomplete, corrupt, or of another model. A UserError: the
    CLI ends it with one line, whichever command read the checkpoint."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed checkpoints under root, oldest first."""
    if not root.exists():
        return []
    steps = []
    for path in root.iterdir():
        match = _COMMITTED_NAME.fullmatch(path.name)
        if match and (path / META_FILE).exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(root: Path) -> Path | None:
    steps = committed_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def file_checksums(folder: Path) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} of every file in folder but lbva_meta.json."""
    paths = [path for path in sorted(Path(folder).iterdir()) if path.is_file() and path.name != META_FILE]
    return {path.name: {"sha256": digest, "bytes": path.stat().st_size}
            for path, digest in zip(paths, sha256_files(paths))}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """The sha256 hex digest of each file, in order."""
    # hashlib releases the interpreter lock on large blocks, so files hash in parallel threads.
    if len(paths) < 2:
        return [_sha256(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(_sha256, paths))


def read_meta(folder: Path) -> dict:
    """A committed checkpoint's lbva_meta.json; CheckpointError when it is missing or damaged
    (not JSON, cut, or without the file sizes and checksums recorded at save time)."""
    path = Path(folder) / META_FILE
    if not path.exists():
        raise CheckpointError(f"{folder}: not a committed lbva checkpoint ({META_FILE} missing)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: damaged, not readable as JSON ({error})") from error
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)
            for info in files.values()):
        raise CheckpointError(f"{path}: damaged, it holds no record of the checkpoint's files and checksums")
    return meta


def read_dcp_metadata(folder: Path):
    """DCP's `.metadata` of a checkpoint (unpickled: only for trusted checkpoints); CheckpointError
    when it is missing or damaged."""
    try:
        return dcp.FileSystemReader(str(folder)).read_metadata()
    except FileNotFoundError as error:
        raise CheckpointError(f"{folder}: DCP metadata (.metadata) missing") from error
    except Exception as error:  # unpickling damaged bytes can raise almost any exception type
        raise CheckpointError(f"{folder}/.metadata: damaged, cannot be read ({type(error).__name__})") from error


def saved_parts(folder: Path, root: str = "train") -> set[str]:
    """The top-level names saved under `root` in a committed checkpoint (e.g. model, optimizer, ema),
    read from DCP's metadata without loading any tensor."""
    metadata = read_dcp_metadata(folder)
    prefix = f"{root}."
    return {key[len(prefix):].split(".", 1)[0] for key in metadata.state_dict_metadata if key.startswith(prefix)}


def verify(folder: Path, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems found in a committed checkpoint (missing, truncated or changed files); empty when
    sound; CheckpointError when its lbva_meta.json is missing or damaged. Without `checksums` only
    presence and sizes are checked. share (k, n): check only the k-th of every n recorded files
    (and, for k = 0, look for files not recorded), so that n ranks split the work and the union of
    their lists is the whole."""
    folder = Path(folder)
    expected = read_meta(folder)["files"]
    index, count = share
    mine = [name for position, name in enumerate(sorted(expected)) if position % count == index]
    problems, to_hash = [], []
    for name in mine:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != expected[name]["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, expected {expected[name]['bytes']} (truncated?)")
        elif checksums:
            to_hash.append(name)
    for name, digest in zip(to_hash, sha256_files([folder / name for name in to_hash])):
        if digest != expected[name]["sha256"]:
            problems.append(f"{name}: checksum differs from the one recorded at save time")
    if index == 0:
        problems.extend(f"{path.name}: not recorded at save time" for path in sorted(folder.iterdir())
                        if path.is_file() and path.name != META_FILE and path.name not in expected)
    return problems


@dataclass
class RetentionPolicy:
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)

    def to_delete(self, steps: list[int], keep_also: tuple[int, ...] = ()) -> list[int]:
        """The steps (oldest first) to delete; `keep_also` are kept whatever the policy."""
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set()
        keep.update(keep_also)
        if steps:
            keep.add(steps[-1])  # never the newest
        if self.keep_every > 0:
            keep.update(s for s in steps if s % self.keep_every == 0)
        return [s for s in steps if s not in keep]


class CheckpointManager:
    """Saves and loads the training state; one instance per rank, all ranks call the same methods.

    With `async_save` on, `save` copies ("stages") the state into CPU buffers kept for the whole
    run and returns; a background thread writes them to disk. On CUDA the buffers are pinned and
    the copy itself runs in the background, so the state must not change until it is done:
    `guard(optimizer)` makes every optimizer step wait for it first (`finish_staging` is the same
    wait by hand). `poll` (called at step boundaries) commits a finished write. Only one write is
    in flight: a new save first waits for the previous one. `close` releases the buffers.
    """

    def __init__(self, root: Path, retention: RetentionPolicy, async_save: bool, process_group=None):
        self.root = Path(root)
        self.retention = retention
        self.async_save = async_save
        self.process_group = process_group
        self._pending: tuple[int, Future | None, dict] | None = None
        # One stager for the run: it keeps its staging buffers between saves, keyed by the
        # storage of each state tensor. A fresh stager per save (dcp.async_save's default) spends
        # most of the save allocating and faulting in new buffers.
        self._stager = (_CudaStager() if torch.cuda.is_available() else _CpuStager()) if async_save else None
        self._staging: Future | None = None
        if self._is_coordinator():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{_PREFIX}*{_PARTIAL}"):
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()

    def _is_coordinator(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def _rank_and_size(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _from_coordinator(self, value):
        """Rank 0's `value` on every rank."""
        if not dist.is_initialized():
            return value
        box = [value]
        dist.broadcast_object_list(box, group=self.process_group, group_src=0)
        return box[0]

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.process_group)

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Write `state` (a DCP state dict: tensors, DTensors, Stateful objects, plain values) as the
        checkpoint of `step`. `meta` (JSON-able: model config, layout, ...) is stored beside it."""
        self.wait()
        partial = Path(f"{step_dir(self.root, step)}{_PARTIAL}")
        if self._is_coordinator():
            partial.mkdir(parents=True, exist_ok=True)
        self._barrier()
        with _single_process_is_intended():
            if self.async_save:
                response = dcp.async_save(state, checkpoint_id=str(partial), process_group=self.process_group,
                                          async_stager=self._stager)
                if isinstance(response, AsyncSaveResponse):  # staging continues in the background
                    self._staging, future = response.staging_completion, response.upload_completion
                else:
                    future = response
            else:
                dcp.save(state, checkpoint_id=str(partial), process_group=self.process_group)
                future = None
        self._pending = (step, future, meta)
        if future is None:
            self._commit()

    def finish_staging(self) -> None:
        """Block until the in-flight save has copied the state; from then on the state may change."""
        if self._staging is not None:
            staging, self._staging = self._staging, None
            staging.result()

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Make each step of `optimizer` first wait for the in-flight save's copy of the state."""
        optimizer.register_step_pre_hook(lambda *_: self.finish_staging())

    def close(self) -> None:
        """Wait for the in-flight save and release the staging buffers."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def poll(self) -> int | None:
        """Commit the in-flight save if its write finished; returns the committed step, if any."""
        if self._pending is None:
            return None
        future = self._pending[1]
        if future is not None and not future.done():
            return None
        return self._commit()

    def wait(self) -> int | None:
        """Block until the in-flight save (if any) is written and committed."""
        self.finish_staging()
        if self._pending is None:
            return None
        future = self._pending[1]
        if future is not None:
            future.result()
        return self._commit()

    def _commit(self) -> int:
        step, future, meta = self._pending
        if future is not None:
            future.result()  # re-raise a failed background write here
        self._pending = None
        if self._is_coordinator():
            partial = Path(f"{step_dir(self.root, step)}{_PARTIAL}")
            record = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "saved_at": time.time(),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                **meta,
                "files": file_checksums(partial),
            }
            _write_synced(partial / META_FILE, json.dumps(record, indent=1))
            _fsync_dir(partial)
            os.replace(partial, step_dir(self.root, step))
            _fsync_dir(self.root)
            # The checkpoint just committed is the newest sound one (its checksums were just taken
            # from the disk), also when folders of higher steps (a history resumed from an earlier
            # checkpoint) outrank it in the policy: it is kept whatever the policy says.
            for old in self.retention.to_delete(committed_steps(self.root), keep_also=(step,)):
                shutil.rmtree(step_dir(self.root, old), ignore_errors=True)
        return step

    def verify(self, folder: Path) -> list[str]:
        """`verify(folder)`, checksums included, with the files split over the group's ranks (and
        hashed in parallel threads on each); every rank returns the same list. A damaged or missing
        lbva_meta.json is one problem in the list. Call it on every rank."""
        rank, size = self._rank_and_size()
        try:
            mine = verify(folder, share=(rank, size))
        except CheckpointError as error:
            mine = [str(error)]
        if size == 1:
            return mine
        gathered: list = [None] * size
        dist.all_gather_object(gathered, mine, group=self.process_group)
        return list(dict.fromkeys(problem for part in gathered for problem in part))

    def newest_sound(self, root: Path) -> tuple[Path | None, dict[Path, list[str]]]:
        """The newest committed checkpoint under root that verifies (None: none does), and the newer
        ones that do not, each with its problems; the same on every rank. Call it on every rank."""
        damaged: dict[Path, list[str]] = {}
        for step in reversed(self._from_coordinator(committed_steps(root))):
            folder = step_dir(root, step)
            problems = self.verify(folder)
            if not problems:
                return folder, damaged
            damaged[folder] = problems
        return None, damaged

    def set_aside(self, folders: list[Path]) -> list[Path]:
        """Rename damaged checkpoints to step_N.damaged (by rank 0; every rank calls it), so that
        resume and retention no longer count them and a new save of step N has its name back.
        -> the new names."""
        moved = []
        if self._is_coordinator():
            for folder in folders:
                moved.append(_unused(Path(f"{folder}{_DAMAGED}")))
                os.replace(folder, moved[-1])
                _fsync_dir(moved[-1].parent)
        return self._from_coordinator(moved)  # also the barrier: no rank reads on before the renames

    def load(self, folder: Path, state: dict) -> dict:
        """Load a committed checkpoint into `state` in place (DCP reshards to the current layout);
        returns its metadata."""
        meta = read_meta(folder)
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(folder), process_group=self.process_group)
        return meta


class _CudaStager(DefaultStager):
    """Pinned buffers, device-to-host copies on a side stream from a background thread. No shared
    memory: the writer is a thread of this process."""

    def __init__(self):
        super().__init__(StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=True,
                                        use_non_blocking_copy=True))

    def stage(self, state_dict, **kwargs):
        # The side stream copies only after the work already queued (the last optimizer step) is done.
        self._staging_stream.wait_stream(torch.accelerator.current_stream())
        return super().stage(state_dict, **kwargs)


class _CpuStager(DefaultStager):
    """The copy stays in `save` and runs on one thread. Staged from a background thread, `save`
    returned no sooner in our measurement (the copy there competes with the caller for the cores
    and the interpreter lock; torch documents asynchronous staging as CUDA-only). One thread: a
    memory copy gains little from more, and loses much when the cores are shared (1 GB on a 2-core
    VM at load ~8: 0.5-0.6 s on one thread, 2.8-3.1 s on two)."""

    def __init__(self):
        super().__init__(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=False))

    def stage(self, state_dict, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().stage(state_dict, **kwargs)
        finally:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns when no process group exists; for a single-process run that is the intent. The
    filter is process-wide because async saves emit it from their background thread."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    yield


def _unused(path: Path) -> Path:
    """path, or path-1, path-2, ...: the first that does not exist."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _write_synced(path: Path, text: str) -> None:
    """Write and fsync a file: its content is on disk before the rename that publishes it."""
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
