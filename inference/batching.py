"""Forwards of concurrent sessions batched into one model call.

Every session of a server runs its requests in its own worker thread, and its denoising loops call
the model through `ForwardBatcher.forward` instead of directly. A forward waits until every request
in progress has handed in a forward too (or `max_wait_s` has passed since it arrived); then one
thread runs every waiting forward, those of the same token counts (`PreparedForward.shape`) together
as one model call (`run_batched`: the CFG rows of all of them on the batch axis, attention per
session on its own cache), the others one call per shape. Sessions whose loops are in step (robots
that started together, or asked at the same moment) therefore share each forward's weight reads; a
session alone never waits, since it is the only request in progress.

Each session's numbers are its own: every layer but attention works per token, and attention runs
per session. The matrix products of a stacked batch may round differently from one session's alone
(the BLAS picks its blocking by shape), so a batched session's actions equal its solo run within
float rounding, not bit for bit (tests/inference/test_server_sessions.py measures it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .cached_forward import CachedModel, PreparedForward, TokenGroup, run_batched


@dataclass(eq=False)
class _Waiting:
    prepared: PreparedForward
    arrived: float
    result: list[torch.Tensor] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class BatchStats:
    """Counts since the batcher was made: model calls, and forwards they ran (forwards / calls is the
    mean batch)."""

    calls: int = 0
    forwards: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # forwards per call -> how many calls


class ForwardBatcher:
    """Gathers the forwards of concurrent requests into shared model calls (module docstring)."""

    def __init__(self, max_wait_s: float = 0.005) -> None:
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._condition = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._active = 0  # requests in progress
        self._running = False  # a thread is running a round of forwards

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count a request in progress for as long as the block runs (the server wraps each one)."""
        with self._condition:
            self._active += 1
        try:
            yield
        finally:
            with self._condition:
                self._active -= 1
                self._condition.notify_all()  # the others may now be all that is left

    def forward(self, cached: CachedModel, groups: Sequence[TokenGroup], rows: int | None = None
                ) -> list[torch.Tensor]:
        """CachedModel.forward, run beside the concurrent requests' forwards of the same shape."""
        item = _Waiting(cached.prepare(groups, rows), time.monotonic())
        with self._condition:
            self._waiting.append(item)
            self._condition.notify_all()
            while not item.done:
                if not self._running and self._ready():
                    batch, self._waiting, self._running = self._waiting, [], True
                    self._condition.release()
                    try:
                        self._run(batch)
                    finally:
                        self._condition.acquire()
                        self._running = False
                        self._condition.notify_all()
                    continue
                self._condition.wait(self._timeout())
        if item.error is not None:
            raise item.error
        return item.result

    def _ready(self) -> bool:
        """Every request in progress waits on a forward, or the oldest has waited long enough."""
        if not self._waiting:
            return False
        if len(self._waiting) >= self._active:
            return True
        return time.monotonic() - min(w.arrived for w in self._waiting) >= self.max_wait_s

    def _timeout(self) -> float | None:
        if self._running or not self._waiting:
            return None
        oldest = min(w.arrived for w in self._waiting)
        return max(0.0, oldest + self.max_wait_s - time.monotonic())

    def _run(self, batch: list[_Waiting]) -> None:
        """Run the gathered forwards, one model call per (model, shape); never raises: each forward's
        error goes to its own waiting thread."""
        by_shape: dict[tuple, list[_Waiting]] = {}
        for item in batch:
            by_shape.setdefault((id(item.prepared.owner.model), item.prepared.shape), []).append(item)
        for items in by_shape.values():
            try:
                results = run_batched(items[0].prepared.owner.model, [w.prepared for w in items])
            except BaseException as error:  # noqa: BLE001 - handed to every thread of this call
                for w in items:
                    w.error = error
            else:
                for w, result in zip(items, results):
                    w.result = result
            self._count(len(items))
        with self._condition:
            for item in batch:
                item.done = True

    def _count(self, size: int) -> None:
        stats = self.stats
        stats.calls += 1
        stats.forwards += size
        stats.largest = max(stats.largest, size)
        stats.sizes[size] = stats.sizes.get(size, 0) + 1
