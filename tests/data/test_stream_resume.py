"""Resuming the prepared-data stream: exactly on the same layout; on another data-parallel size
with nothing repeated or skipped; through a real DataLoader with worker processes."""

import json
import multiprocessing
import subprocess
import time
from collections import Counter

import pytest
import torch

from lbva.errors import UserError
from stream_fixtures import episode_frames, make_loader, take, write_prepared


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_prepared(root, {"alpha": episode_frames(24, seed=1), "beta": episode_frames(20, seed=2)})
    return root


def _assert_same_sequences(left, right):
    assert [s.window_keys for s in left] == [s.window_keys for s in right]
    for a, b in zip(left, right):
        for name, value in vars(a).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(b, name)), name


def _ranks(dataset, world, state, steps):
    """Each rank of a `world`-rank layout restored from `state` runs `steps` steps."""
    out = []
    for rank in range(world):
        loader = make_loader([dataset], rank=rank, world_size=world)
        if state is not None:
            loader.load_state_dict(state)
        out.append((take(loader, steps), loader.state_dict()))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_same_layout_resume_continues_with_the_same_windows_and_tensors(dataset, world):
    total, first = 9, 4
    straight = _ranks(dataset, world, None, total)
    interrupted = _ranks(dataset, world, None, first)
    state = json.loads(json.dumps(interrupted[0][1]))  # what a checkpoint stores
    resumed = _ranks(dataset, world, state, total - first)
    for rank in range(world):
        _assert_same_sequences(straight[rank][0], interrupted[rank][0][0:first] + resumed[rank][0])


def test_every_rank_reports_the_same_small_json_state(dataset):
    states = [state for _, state in _ranks(dataset, 4, None, 3)]
    assert all(state == states[0] for state in states)
    assert states[0]["consumed"] == 12
    assert len(json.dumps(states[0])) < 300


@pytest.mark.parametrize("new_world", [1, 4])
def test_resume_on_another_data_parallel_size_repeats_and_skips_nothing(dataset, new_world):
    old_world, old_steps, new_steps = 2, 3, 3
    old = _ranks(dataset, old_world, None, old_steps)
    new = _ranks(dataset, new_world, old[0][1], new_steps)
    consumed = [tuple(s.window_keys) for sequences, _ in old + new for s in sequences]

    straight = take(make_loader([dataset]), old_world * old_steps + new_world * new_steps)
    straight_windows = [k for s in straight for k in s.window_keys]
    assert len(set(straight_windows)) == len(straight_windows)  # the span stays inside one epoch
    assert Counter(consumed) == Counter(tuple(s.window_keys) for s in straight)
    assert new[0][1]["consumed"] == len(straight)


def test_a_dataloader_with_two_workers_keeps_the_order_and_the_state(dataset):
    in_process = make_loader([dataset], num_workers=0)
    expected = take(in_process, 8)
    workers = make_loader([dataset], num_workers=2)
    first = take(workers, 5)
    state = workers.state_dict()
    assert state["consumed"] == 5
    restored = make_loader([dataset], num_workers=0)
    restored.load_state_dict(state)
    _assert_same_sequences(expected, first + take(restored, 3))


def test_a_state_from_another_plan_is_refused(dataset):
    state = make_loader([dataset]).state_dict()
    with pytest.raises(UserError, match="data plan"):
        make_loader([dataset], seed=1).load_state_dict(state)


def test_loader_workers_survive_a_sigterm_from_outside_and_end_when_the_iterator_closes(dataset):
    """Slurm's SIGTERM reaches every process of a job, loader workers included: they keep loading
    until the rank, which checkpoints first, closes its iterator, and then they are gone."""
    expected = take(make_loader([dataset], num_workers=0), 6)
    others = set(multiprocessing.active_children())
    iterator = iter(make_loader([dataset], num_workers=2))
    got = [next(iterator) for _ in range(2)]
    workers = [child for child in multiprocessing.active_children() if child not in others]
    assert len(workers) == 2
    # From another process, as slurmstepd sends it (torch's worker handler spares only its parent's).
    subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers)], check=True)
    subprocess.run(["kill", "-USR2", *(str(w.pid) for w in workers)], check=True)
    time.sleep(0.5)
    got += [next(iterator) for _ in range(4)]  # a dead worker would raise here
    _assert_same_sequences(expected, got)
    assert all(w.is_alive() for w in workers)
    iterator.close()
    assert not any(w.is_alive() for w in workers)
    assert all(w.exitcode == 0 for w in workers)  # ended by their iterator, not by a signal
