"""StopFlag: signals only set a flag; all ranks stop at the same step boundary."""

import os
import signal
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lbva.launchers.signals import StopFlag, StopReason


def test_no_signal_no_stop():
    with StopFlag() as stop:
        assert not stop(1) and stop.reason is StopReason.NONE


def test_sigusr2_stops_at_the_next_step_boundary_for_the_time_limit():
    with StopFlag() as stop:
        assert not stop(1)
        signal.raise_signal(signal.SIGUSR2)
        assert stop(2) and stop.reason is StopReason.TIME_LIMIT


def test_sigterm_stops_for_termination():
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop(1) and stop.reason is StopReason.TERMINATE


def test_the_time_limit_outranks_termination():
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGTERM)
        assert stop(1) and stop.reason is StopReason.TIME_LIMIT


def test_restore_puts_back_the_previous_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with StopFlag():
            signal.raise_signal(signal.SIGUSR2)
            assert seen == []
        signal.raise_signal(signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _first_stop(rank: int, world_size: int, port: int, signalled_rank: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with StopFlag() as stop:
            for step in range(1, 6):
                if rank == signalled_rank and step == 2:
                    signal.raise_signal(signal.SIGUSR2)
                if stop(step):
                    results[rank] = (step, stop.reason)
                    return
            results[rank] = (None, stop.reason)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_to_stop_at_the_same_step_when_one_rank_got_the_signal():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_first_stop, args=(2, port, 1, results), nprocs=2, start_method="spawn")
    assert dict(results) == {0: (2, StopReason.TIME_LIMIT), 1: (2, StopReason.TIME_LIMIT)}
