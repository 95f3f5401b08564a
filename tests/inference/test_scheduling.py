"""How a server runs its concurrent sessions' requests: one at a time, several at once, or batched."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lbva.inference.scheduling import SessionScheduling, cpu_parallel_requests


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def choose(device: str, batch=None, parallel=None, sessions=4) -> SessionScheduling:
    return SessionScheduling.choose(torch.device(device), batch=batch, parallel=parallel, batch_wait_s=0.005,
                                    sessions=sessions)


def test_a_cpu_runs_as_many_requests_at_once_as_its_cores_hold_at_the_intra_op_thread_count(one_thread):
    cores = len(os.sched_getaffinity(0))
    assert cpu_parallel_requests() == cores
    scheduling = choose("cpu", sessions=64)
    assert scheduling.batcher is None and scheduling.parallel == cores
    torch.set_num_threads(cores)  # torch's default, a thread per core: one request at a time
    assert cpu_parallel_requests() == 1 and choose("cpu").parallel == 1


def test_never_more_requests_at_once_than_sessions(one_thread):
    assert choose("cpu", parallel=8, sessions=3).parallel == 3


def test_cuda_batches_the_sessions_by_default():
    scheduling = choose("cuda")
    assert scheduling.batcher is not None and scheduling.batcher.max_wait_s == 0.005
    assert choose("cuda", batch=False).parallel == 1


def test_batching_with_parallel_requests_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--batch-sessions off"):
        choose("cpu", batch=True, parallel=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        choose("cpu", parallel=0)


@pytest.mark.parametrize("parallel", [1, 2])
def test_at_most_parallel_requests_hold_a_turn_at_once(parallel):
    scheduling = SessionScheduling(parallel)
    inside = 0
    most = 0
    count = threading.Lock()

    def request(_: int) -> None:
        nonlocal inside, most
        with scheduling.request():
            with count:
                inside += 1
                most = max(most, inside)
            time.sleep(0.02)
            with count:
                inside -= 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(request, range(12)))
    assert most == parallel == scheduling.most_at_once
