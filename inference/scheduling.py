"""How a server runs the requests of its concurrent sessions (one robot each), chosen once per server.

    one at a time   the requests of all sessions run one after another.
    parallel (n)    up to n requests run at once, each in its session's worker thread, each forward
                    alone. PyTorch releases the GIL inside its kernels, so on a CPU two requests at
                    one intra-op thread each keep two cores busy, where one request at a time leaves
                    every core but its own threads idle. The default on a CPU is the cores this
                    process may use over torch's intra-op thread count (`lbva serve --threads 1` on
                    8 cores: 8 at once; at torch's default, one thread per core, 1).
    batched         the sessions share a ForwardBatcher (batching.py): forwards of the same token
                    counts run as one model call. The default on CUDA, where a one-session
                    forward leaves the GPU mostly idle (the gain there is not measured yet); on a
                    CPU a stacked call costs about what its parts cost.

Each session's numbers are its own either way: one at a time and parallel run exactly the forwards a
session alone runs (bit for bit at the same intra-op thread count); batched ones may round
differently (batching.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .batching import ForwardBatcher


def cpu_parallel_requests() -> int:
    """Requests that fit this CPU side by side: the cores this process may use over torch's intra-op
    thread count, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // torch.get_num_threads())


class SessionScheduling:
    """Admission of the concurrent sessions' requests (module docstring). `request()` wraps each
    request; `batcher` goes to every session's runtime (`InferenceRuntime.new_session`)."""

    def __init__(self, parallel: int = 1, batcher: ForwardBatcher | None = None) -> None:
        if parallel < 1:
            raise ValueError(f"parallel requests must be >= 1, got {parallel}")
        if batcher is not None and parallel != 1:
            raise ValueError("batched sessions share one model call at a time: parallel requests must be 1")
        self.parallel = parallel
        self.batcher = batcher
        self.most_at_once = 0  # the most requests that have run at the same time so far
        self._slots = threading.BoundedSemaphore(parallel)
        self._counting = threading.Lock()
        self._running = 0

    @classmethod
    def choose(cls, device: torch.device, *, batch: bool | None, parallel: int | None, batch_wait_s: float,
               sessions: int) -> SessionScheduling:
        """A server's scheduling: batch None is batched on CUDA only; parallel None is
        `cpu_parallel_requests()` on a CPU, 1 elsewhere; never more at once than `sessions`."""
        batched = device.type == "cuda" if batch is None else batch
        if batched:
            if parallel not in (None, 1):
                raise ValueError(f"{parallel} parallel requests need batching off (--batch-sessions off): "
                                 "batched sessions run one model call at a time")
            return cls(batcher=ForwardBatcher(batch_wait_s))
        if parallel is None:
            parallel = cpu_parallel_requests() if device.type == "cpu" else 1
        return cls(min(parallel, sessions))

    @contextmanager
    def request(self) -> Iterator[None]:
        """Hold a request's turn for as long as the block runs."""
        if self.batcher is not None:
            with self.batcher.request():
                yield
            return
        with self._slots:
            with self._counting:
                self._running += 1
                self.most_at_once = max(self.most_at_once, self._running)
            try:
                yield
            finally:
                with self._counting:
                    self._running -= 1

    def describe(self) -> str:
        if self.batcher is not None:
            return "sessions batched (concurrent forwards share model calls)"
        if self.parallel == 1:
            return "one request at a time"
        return f"up to {self.parallel} requests at once"
