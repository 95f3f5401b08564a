"""Atomic commit, retention, verification and crash safety of the checkpoint manager."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lbva.checkpoints_tools.manager import (
    CheckpointManager, RetentionPolicy, committed_steps, latest_checkpoint, read_meta, step_dir, verify,
)


def _state(value: float, size: int = 64):
    return {"weights": torch.full((size, size), value), "step": int(value)}


def test_a_synchronous_save_is_committed_with_its_metadata(tmp_path):
    manager = CheckpointManager(tmp_path, RetentionPolicy(keep_last=2), async_save=False)
    manager.save(5, _state(5.0), {"model": {"layout": "mot"}})
    assert committed_steps(tmp_path) == [5]
    meta = read_meta(step_dir(tmp_path, 5))
    assert meta["step"] == 5 and meta["model"] == {"layout": "mot"} and ".metadata" in meta["files"]


def test_an_async_save_is_committed_by_wait_and_loads_back(tmp_path):
    manager = CheckpointManager(tmp_path, RetentionPolicy(), async_save=True)
    manager.save(3, _state(3.0), {})
    assert manager.wait() == 3
    target = _state(0.0)
    manager.load(latest_checkpoint(tmp_path), target)
    assert torch.equal(target["weights"], torch.full((64, 64), 3.0)) and target["step"] == 3


def test_retention_keeps_the_last_n_and_every_mth():
    policy = RetentionPolicy(keep_last=2, keep_every=100)
    assert policy.to_delete([50, 100, 150, 200, 250, 300]) == [50, 150]


def test_retention_never_deletes_the_newest():
    assert RetentionPolicy(keep_last=0).to_delete([1, 2]) == [1]


def test_old_checkpoints_are_removed_after_a_commit(tmp_path):
    manager = CheckpointManager(tmp_path, RetentionPolicy(keep_last=2), async_save=False)
    for step in (1, 2, 3):
        manager.save(step, _state(float(step)), {})
    assert committed_steps(tmp_path) == [2, 3]


def test_verify_finds_truncated_and_missing_files(tmp_path):
    manager = CheckpointManager(tmp_path, RetentionPolicy(), async_save=False)
    manager.save(1, _state(1.0), {})
    folder = step_dir(tmp_path, 1)
    assert verify(folder) == []
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-10])
    assert any("truncated" in problem for problem in verify(folder, checksums=False))
    shard.unlink()
    assert any("missing" in problem for problem in verify(folder))


def test_verify_finds_changed_bytes(tmp_path):
    manager = CheckpointManager(tmp_path, RetentionPolicy(), async_save=False)
    manager.save(1, _state(1.0), {})
    shard = next(p for p in step_dir(tmp_path, 1).iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("checksum" in problem for problem in verify(step_dir(tmp_path, 1)))


def test_kill_during_an_async_save_leaves_the_previous_checkpoint_newest(tmp_path):
    # A child commits step 1, starts a large async save of step 2 and is SIGKILLed while writing.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from lbva.checkpoints_tools.manager import CheckpointManager, RetentionPolicy
        manager = CheckpointManager({str(tmp_path)!r}, RetentionPolicy(), async_save=True)
        manager.save(1, {{"w": torch.ones(8, 8)}}, {{}})
        manager.wait()
        manager.save(2, {{"w": torch.randn(4096, 4096 * 4)}}, {{}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 1)
    assert not step_dir(tmp_path, 2).exists()
    CheckpointManager(tmp_path, RetentionPolicy(), async_save=True)  # the next start cleans up
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert verify(step_dir(tmp_path, 1)) == []


def test_async_saves_share_one_stager_and_each_keeps_its_own_values(tmp_path, monkeypatch):
    import lbva.checkpoints_tools.manager as manager_module

    stagers = []
    original = manager_module.dcp.async_save

    def recording_async_save(state, **kwargs):
        stagers.append(kwargs["async_stager"])
        return original(state, **kwargs)

    monkeypatch.setattr(manager_module.dcp, "async_save", recording_async_save)
    manager = CheckpointManager(tmp_path, RetentionPolicy(), async_save=True)
    state = _state(1.0)
    manager.save(1, state, {})
    state["weights"].fill_(2.0)  # in place: the second save stages into the buffers of the first
    manager.save(2, state, {})
    manager.close()
    assert stagers[0] is not None and stagers[0] is stagers[1]
    for step, value in ((1, 1.0), (2, 2.0)):
        target = _state(0.0)
        manager.load(step_dir(tmp_path, step), target)
        assert torch.equal(target["weights"], torch.full((64, 64), value))


def test_a_guarded_optimizer_step_after_an_async_save_leaves_the_saved_weights(tmp_path):
    weight = torch.nn.Parameter(torch.ones(256, 256))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    manager = CheckpointManager(tmp_path, RetentionPolicy(), async_save=True)
    manager.guard(optimizer)
    manager.save(1, {"weight": weight}, {})
    weight.grad = torch.ones_like(weight)
    optimizer.step()  # waits for the save's copy of the weight, then changes the weight
    manager.close()
    target = {"weight": torch.zeros(256, 256)}
    manager.load(step_dir(tmp_path, 1), target)
    assert torch.equal(target["weight"], torch.ones(256, 256))
    assert torch.equal(weight.detach(), torch.zeros(256, 256))
