"""Two gloo ranks under torchrun: `checkpoint.resume=auto` past a damaged checkpoint takes the same
fallback on every rank, and the resumed run trains on exactly the samples of the straight run."""

from lbva.checkpoints_tools.manager import committed_steps, read_meta, step_dir, verify
from lbva.training.ledger import read_ledger

from test_distributed_resume import _losses, _overrides, _torchrun, prepared  # noqa: F401 (fixture)


def test_two_ranks_fall_back_together_past_a_shard_that_only_rank_one_hashes(prepared, tmp_path):
    settings = ("parallel.dp_shard=2", "checkpoint.every=2")
    _torchrun(2, _overrides(prepared, tmp_path, "straight", 6, *settings))
    _torchrun(2, _overrides(prepared, tmp_path, "split", 4, *settings))
    run_dir = tmp_path / "split"
    folder = step_dir(run_dir / "checkpoints", 4)
    # Ranks split the checksum work by position in the sorted file list; rank 1 hashes the odd ones.
    shard = next(folder / name for name in sorted(read_meta(folder)["files"])[1::2] if name.endswith(".distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    output = _torchrun(2, _overrides(prepared, tmp_path, "split", 6, *settings, "checkpoint.resume=auto")).stdout
    assert f"{shard.name}: checksum differs" in output and "falling back to the newest sound checkpoint" in output
    assert f"resumed from {step_dir(run_dir / 'checkpoints', 2)} at step 2" in output
    # Steps 3 and 4 ran again on both dp ranks; every step trained the windows of the straight run.
    assert read_ledger(run_dir) == read_ledger(tmp_path / "straight")
    for ledger in ("dp0.jsonl", "dp1.jsonl"):
        assert (run_dir / "ledger" / ledger).read_text().count('"step": 3,') == 2
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    assert (run_dir / "checkpoints" / "step_00000004.damaged").is_dir()
    assert committed_steps(run_dir / "checkpoints") == [2, 4, 6] and verify(folder) == []
