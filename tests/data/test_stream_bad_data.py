"""Bad data is counted, logged with shard and key, and skipped (or fails, by policy); every rank
still yields one sequence per step, and a sequence with no good window trains to a zero loss."""

import logging
from itertools import islice

import pytest
import torch

from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.training.config import ObjectiveConfig
from lbva.training.data.reader import DataError
from lbva.training.step import FlowMatchingObjective
from stream_fixtures import (
    BREAKAGES, CHANNELS, TEXT_DIM, episode_frames, make_loader, make_stream, take, write_prepared,
)

EXPECTED_KIND = {
    "nan_latents": "non_finite", "inf_actions": "non_finite", "short_actions": "length_mismatch",
    "index_frames": "index_mismatch", "garbage_latents": "undecodable",
}
FRAMES = {"alpha": episode_frames(6, seed=1), "beta": episode_frames(5, seed=2)}
BAD_FRAME = {"nan_latents": 0, "inf_actions": -1}  # the latent frame stream_fixtures breaks


def _holds(window_key: str, frame: int) -> bool:
    start, frames = map(int, window_key.split("@")[1].split("+"))
    return start <= frame < start + frames


def _one_epoch(loader) -> list:
    """Enough steps that every sample of the fixtures is drawn at least once."""
    return take(loader, 40)


def _keys(sequences) -> set[str]:
    return {key.split("@")[0] for s in sequences for key in s.window_keys}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_sample_is_skipped_counted_and_logged_with_shard_and_key(tmp_path, caplog, breakage):
    prepared = write_prepared(tmp_path, FRAMES, broken={"alpha__e000001__s000": breakage})
    loader = make_loader([tmp_path])
    with caplog.at_level(logging.WARNING, logger="lbva.data"):
        sequences = _one_epoch(loader)
    broken_windows = [key for s in sequences for key in s.window_keys if key.startswith("alpha__e000001__s000@")]
    if breakage in BAD_FRAME:
        # Windows read only their frames: the windows holding the bad frame are dropped, the others train.
        bad_frame = BAD_FRAME[breakage] % FRAMES["alpha"][1]
        assert broken_windows and not [key for key in broken_windows if _holds(key, bad_frame)]
        assert _keys(sequences) == set(prepared.latents)
    else:
        assert broken_windows == []
        assert _keys(sequences) == set(prepared.latents) - {"alpha__e000001__s000"}
    assert set(loader.bad_data) == {EXPECTED_KIND[breakage]}
    shard = str(prepared.shards["alpha__e000001__s000"])
    assert any("alpha__e000001__s000" in r.message and shard in r.message for r in caplog.records)


def test_a_truncated_shard_loses_only_the_samples_past_the_cut(tmp_path):
    prepared = write_prepared(tmp_path, FRAMES, samples_per_shard=3)
    shard = prepared.shards["alpha__e000000__s000"]
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    loader = make_loader([tmp_path])
    keys = _keys(_one_epoch(loader))
    assert "alpha__e000000__s000" in keys and "alpha__e000002__s000" not in keys
    assert loader.bad_data and set(loader.bad_data) <= {"truncated", "missing_sample"}


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_an_unreadable_or_missing_shard_skips_its_samples(tmp_path, damage):
    prepared = write_prepared(tmp_path, FRAMES, samples_per_shard=3)
    shard = prepared.shards["beta__e000000__s000"]
    if damage == "garbage":
        shard.write_bytes(b"this is not a tar file" * 10)
    else:
        shard.unlink()
    loader = make_loader([tmp_path])
    keys = _keys(_one_epoch(loader))
    assert not keys & {k for k, s in prepared.shards.items() if s == shard}
    assert set(loader.bad_data) == {"unreadable_shard"}


def test_shards_without_an_index_are_counted_and_their_source_left_out(tmp_path):
    prepared = write_prepared(tmp_path, FRAMES, samples_per_shard=3)
    (tmp_path / "index" / "beta" / "t000.jsonl").unlink()
    loader = make_loader([tmp_path])
    assert [s.name for s in loader.stream.sources] == ["alpha"]
    beta_shards = {shard for key, shard in prepared.shards.items() if key.startswith("beta")}
    assert loader.bad_data == {"missing_index": len(beta_shards)}
    assert all(k.startswith("alpha") for k in _keys(take(loader, 5)))


def test_malformed_index_lines_are_counted_and_skipped(tmp_path):
    write_prepared(tmp_path, FRAMES)
    index = tmp_path / "index" / "alpha" / "t000.jsonl"
    index.write_text(index.read_text() + '{"key": "alpha__e000099__s000", "source": "alpha"}\n{not json\n')
    loader = make_loader([tmp_path])
    assert loader.bad_data == {"bad_index_line": 2}
    assert len(loader.stream.sources[0].entries) == len(FRAMES["alpha"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_fail_policy_raises_naming_shard_and_key(tmp_path, num_workers):
    prepared = write_prepared(tmp_path, FRAMES, broken={"beta__e000002__s000": "nan_latents"})
    with pytest.raises(DataError, match="beta__e000002__s000.*" + str(prepared.shards["beta__e000002__s000"].name)):
        _one_epoch(make_loader([tmp_path], on_error="fail", num_workers=num_workers))
    (tmp_path / "index" / "alpha" / "t000.jsonl").unlink()
    with pytest.raises(DataError, match="missing_index"):
        make_loader([tmp_path], on_error="fail")


@pytest.fixture
def half_broken(tmp_path):
    """Every sample of source beta is broken (in every window: a NaN would spoil only its own); alpha is fine."""
    broken = {f"beta__e{e:06d}__s000": "garbage_latents" for e in range(len(FRAMES["beta"]))}
    write_prepared(tmp_path, FRAMES, broken=broken)
    return tmp_path


def test_every_rank_yields_one_sequence_per_step_whatever_is_broken(half_broken):
    steps, world = 12, 3
    for rank in range(world):
        stream = make_stream([half_broken], rank=rank, world_size=world)
        indices = [item.index for item in islice(iter(stream), steps)]
        assert indices == [rank + world * k for k in range(steps)]


def test_a_sequence_with_no_good_window_is_padding_only_and_trains_to_zero_loss(half_broken):
    loader = make_loader([half_broken], weights={"beta": 1})
    sequence = take(loader, 1)[0]
    assert sequence.real_tokens == 0 and sequence.window_keys == []
    good = take(make_loader([half_broken], weights={"alpha": 1}), 1)[0]
    for name, value in vars(good).items():
        if isinstance(value, torch.Tensor):
            padding = getattr(sequence, name)
            assert padding.dtype == value.dtype and padding.shape[1:] == value.shape[1:], name

    torch.manual_seed(0)
    model = LingBotVA(get_preset("tiny-mot", in_channels=CHANNELS, text_dim=TEXT_DIM))
    objective = FlowMatchingObjective(ObjectiveConfig(), empty_text=loader.stream.empty_text)
    draws = objective.draw(sequence, torch.Generator().manual_seed(0))
    terms = objective(model, sequence, draws, "sdpa", torch.device("cpu"))
    terms.total.backward()
    assert terms.total.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
