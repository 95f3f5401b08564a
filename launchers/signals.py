"""Stopping a run at a step boundary when Slurm signals it.

Slurm warns a job that its time limit is near with the signal of `--signal` (SIGUSR2 here), and
ends a job (scancel, preemption, `scontrol requeue`, the time limit itself) with SIGTERM, then
SIGKILL after KillWait. A handler that checkpointed by itself would run in the middle of a step,
and the ranks of a job receive signals at different moments: one rank would leave the collectives
the others are waiting in. So the handlers only record the signal; `StopFlag`, which the trainer
asks after every optimizer step (`train(..., stop=flag)`), turns the record into a decision all
ranks share: one all-reduce (max) of the recorded reason at each step boundary, a few bytes next
to the gradients' gigabytes. The trainer then checkpoints that step on every rank and returns.
"""

from __future__ import annotations

import enum
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist


class StopReason(enum.IntEnum):
    """Why a run stopped early. The order matters: ranks agree on the largest reason any saw."""

    NONE = 0
    TERMINATE = 1  # SIGTERM: the job is being ended; Slurm (or whoever cancels) decides what follows
    TIME_LIMIT = 2  # SIGUSR2 from --signal: the time limit is near; the job should requeue itself


SIGNAL_REASONS = {signal.SIGTERM: StopReason.TERMINATE, signal.SIGUSR2: StopReason.TIME_LIMIT}


class StopFlag:
    """The trainer's `stop` callback: True at the first step boundary after any rank got SIGUSR2 or
    SIGTERM, on all ranks at the same step.

    `install()` (or `with StopFlag() as flag:`) puts in handlers that record the signal and keeps
    the previous ones, which `restore()` puts back. After a True answer `reason` holds the agreed
    reason, the same on every rank.
    """

    def __init__(self) -> None:
        self._received = StopReason.NONE  # what this process saw; written by the handler only
        self.reason = StopReason.NONE
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> StopFlag:
        for signum in SIGNAL_REASONS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    @property
    def received(self) -> StopReason:
        """The most important signal this process got (not agreed with other ranks)."""
        return self._received

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: no I/O here (a print could re-enter a
        # print it interrupted), no collectives; just remember the most important signal seen.
        self._received = max(self._received, SIGNAL_REASONS[signal.Signals(signum)])

    def __call__(self, step: int) -> bool:
        reason = self._received
        if dist.is_available() and dist.is_initialized():
            reason = _agree(reason)
        self.reason = StopReason(reason)
        return self.reason != StopReason.NONE


def _agree(local: StopReason) -> StopReason:
    """The largest reason over all ranks of the default process group."""
    # NCCL reduces only CUDA tensors; any other backend (gloo, or a "cpu:gloo,cuda:nccl" pair)
    # takes a CPU tensor. The .item() syncs with the GPU once per step, as the loss logging
    # already does.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return StopReason(int(flag.item()))


def ignore_stop_signals() -> None:
    """Ignore SIGUSR2 and SIGTERM from here on, in a process whose run is saved and that is about to
    exit. Slurm's SIGTERM can still come (after a requeue, at the end of a cancelled job) while
    Python shuts down, when it has put back the default handlers: the process would die of it and
    torchrun would report a failed worker for a clean exit. An ignored signal stays ignored."""
    for signum in SIGNAL_REASONS:
        signal.signal(signum, signal.SIG_IGN)
