"""Sharded, asynchronous, atomically committed training checkpoints (torch.distributed.checkpoint).

Layout under a run directory:

    checkpoints/step_00001200/          committed: DCP shards + .metadata + lbva_meta.json
    checkpoints/step_00001300.partial/  being written (never read; removed on the next start)

A checkpoint becomes visible only by the rename of its `.partial` folder, done by rank 0 after
DCP's own metadata file exists, which DCP writes once every rank's shards are on disk. A crash at
any point therefore leaves the previous committed checkpoint as the newest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

META_FILE = "lbva_meta.json"
FORMAT_VERSION = 1
_PREFIX, _PARTIAL = "step_", ".partial"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, corrupt, or of another model."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed checkpoints under root, oldest first."""
    if not root.exists():
        return []
    steps = []
    for path in root.iterdir():
        name = path.name
        if name.startswith(_PREFIX) and not name.endswith(_PARTIAL) and (path / META_FILE).exists():
            steps.append(int(name[len(_PREFIX):]))
    return sorted(steps)


def latest_checkpoint(root: Path) -> Path | None:
    steps = committed_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def file_checksums(folder: Path) -> dict[str, dict]:
    sums = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != META_FILE:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            sums[path.name] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return sums


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise CheckpointError(f"{folder}: not a committed lbva checkpoint ({META_FILE} missing)")
    return json.loads(path.read_text())


def saved_parts(folder: Path, root: str = "train") -> set[str]:
    """The top-level names saved under `root` in a committed checkpoint (e.g. model, optimizer, ema),
    read from DCP's metadata without loading any tensor."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    prefix = f"{root}."
    return {key[len(prefix):].split(".", 1)[0] for key in metadata.state_dict_metadata if key.startswith(prefix)}


def verify(folder: Path, checksums: bool = True) -> list[str]:
    """Problems found in a committed checkpoint (missing, truncated or changed files); empty when
    sound. Without `checksums` only presence and sizes are checked (cheap enough for every resume)."""
    folder = Path(folder)
    expected = read_meta(folder)["files"]
    problems = []
    if checksums:
        actual = file_checksums(folder)
    else:
        actual = {p.name: {"bytes": p.stat().st_size} for p in folder.iterdir() if p.is_file() and p.name != META_FILE}
    for name, info in expected.items():
        if name not in actual:
            problems.append(f"{name}: missing")
        elif actual[name]["bytes"] != info["bytes"]:
            problems.append(f"{name}: {actual[name]['bytes']} bytes, expected {info['bytes']} (truncated?)")
        elif checksums and actual[name]["sha256"] != info["sha256"]:
            problems.append(f"{name}: checksum differs from the one recorded at save time")
    problems.extend(f"{name}: not recorded at save time" for name in actual if name not in expected)
    return problems


@dataclass
class RetentionPolicy:
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)

    def to_delete(self, steps: list[int]) -> list[int]:
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set()
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
            (partial / META_FILE).write_text(json.dumps(record, indent=1))
            _fsync_dir(partial)
            os.replace(partial, step_dir(self.root, step))
            _fsync_dir(self.root)
            for old in self.retention.to_delete(committed_steps(self.root)):
                shutil.rmtree(step_dir(self.root, old), ignore_errors=True)
        return step

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
