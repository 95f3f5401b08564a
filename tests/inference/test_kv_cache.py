"""KV cache: FIFO eviction by write group, predicted vs ground-truth slots, transient writes, and what
one cached forward stores at each depth."""

import pytest
import torch

from inference_fixtures import tiny_model
from lbva.inference.cached_forward import CachedModel, TokenGroup
from lbva.inference.kv_cache import KVCache, WriteMode
from lbva.models.attention import AttentionKernels, sdpa_kernel
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM
from lbva.models.mot import ModelInputs
from lbva.models.patching import action_positions, video_positions

GT, PRED, TRANSIENT = WriteMode.GROUND_TRUTH, WriteMode.PREDICTED, WriteMode.TRANSIENT


def cache(capacity: int = 10) -> KVCache:
    return KVCache(num_layers=2, capacity=capacity, batch=1, num_heads=1, head_dim=2)


def write(kv: KVCache, *groups: tuple[int, WriteMode]) -> None:
    """Reserve and commit groups of (size, mode), all of chunk 0."""
    kv.commit(kv.reserve([size for size, _ in groups], [mode for _, mode in groups], [0] * len(groups)))


def stored(kv: KVCache) -> list[tuple[int, int, bool]]:
    return [(g.write_id, g.size, g.predicted) for g in kv.groups()]


def test_full_pool_evicts_whole_groups_oldest_write_first():
    kv = cache(10)
    write(kv, (4, GT), (3, GT), (3, PRED))
    write(kv, (2, GT))  # needs 2 free slots: the oldest group (4 slots) goes, not just 2 of its slots
    assert stored(kv) == [(1, 3, False), (2, 3, True), (3, 2, False)]
    write(kv, (6, GT))  # 2 free: groups 1 then 2 go
    assert stored(kv) == [(3, 2, False), (4, 6, False)]


def test_eviction_order_is_write_order_not_slot_order():
    kv = cache(6)
    write(kv, (2, GT), (2, PRED), (2, GT))
    kv.clear_predicted()  # frees the middle slots
    write(kv, (2, GT))  # lands in the freed middle slots, but is the newest write
    write(kv, (2, GT))
    assert [g.write_id for g in kv.groups()] == [2, 3, 4]


def test_clear_predicted_drops_predicted_slots_and_keeps_ground_truth():
    kv = cache(10)
    write(kv, (3, GT), (2, PRED))
    write(kv, (2, PRED), (1, GT))
    kv.clear_predicted()
    assert stored(kv) == [(0, 3, False), (3, 1, False)]
    assert int((kv.write_id >= 0).sum()) == 4


def test_transient_groups_take_no_slots_and_evict_nothing():
    kv = cache(4)
    write(kv, (4, GT))
    reservation = kv.reserve([8], [TRANSIENT], [0])  # more than the capacity, yet nothing is evicted
    assert reservation.group_slots == (None,)
    assert reservation.readable.tolist() == [0, 1, 2, 3]
    kv.commit(reservation)
    assert stored(kv) == [(0, 4, False)]


def test_a_forward_reads_what_was_stored_before_it_not_its_own_writes():
    kv = cache(10)
    write(kv, (3, GT))
    reservation = kv.reserve([2, 1], [PRED, TRANSIENT], [2, 2])
    assert reservation.readable.tolist() == [0, 1, 2]
    assert reservation.readable_chunk_ids.tolist() == [0, 0, 0]
    kv.commit(reservation)
    assert stored(kv) == [(0, 3, False), (1, 2, True)]


def test_an_aborted_forward_frees_its_slots():
    kv = cache(6)
    write(kv, (2, GT))
    reservation = kv.reserve([3], [GT], [0])
    kv.abort(reservation)
    assert stored(kv) == [(0, 2, False)]
    write(kv, (4, GT))  # the pool is usable again
    assert stored(kv) == [(0, 2, False), (2, 4, False)]


def test_one_forward_writing_more_than_the_capacity_is_refused():
    with pytest.raises(ValueError, match="attention window"):
        cache(4).reserve([3, 2], [GT, PRED], [0, 1])


def _group(modality, chunk, role, write_mode, seed):
    g = torch.Generator().manual_seed(seed)
    if modality == "video":
        tokens = torch.randn(8, 192, generator=g)
        positions = video_positions(2, 2, 2, frame_offset=2 * chunk)
    else:
        tokens = torch.randn(4, 30, generator=g)
        positions = action_positions(2, 2, frame_offset=2 * chunk)
    return TokenGroup(modality, chunk, role, tokens, torch.zeros(len(tokens)), positions, write_mode)


def _cached_model(model, capacity=64):
    kv = KVCache(model.config.num_layers, capacity, 1, model.config.num_heads, model.config.head_dim)
    return CachedModel(model, kv, torch.randn(1, 3, model.config.text_dim, generator=torch.Generator().manual_seed(9)))


def test_each_depth_stores_the_keys_and_values_that_depth_attended_with():
    model = tiny_model()
    cached = _cached_model(model)
    group = _group("video", 0, CLEAN, GT, seed=1)
    cached.forward([group])

    seen = []

    def recording(q, k, v):
        seen.append((k, v))
        return sdpa_kernel(None)(q, k, v)

    inputs = ModelInputs(group.tokens[None], group.timesteps[None], group.positions[None], torch.zeros(1, 0, 30),
                         torch.zeros(1, 0), torch.zeros(1, 0, 3), cached.text)
    with torch.no_grad():
        model(inputs, AttentionKernels(recording, sdpa_kernel(None)))
    slots = cached.cache.groups()
    assert len(seen) == model.config.num_layers and len(slots) == 1
    for depth, (k, v) in enumerate(seen):
        torch.testing.assert_close(cached.cache.keys[depth][:, :8], k)
        torch.testing.assert_close(cached.cache.values[depth][:, :8], v)


def test_a_transient_group_is_attended_by_its_forward_and_leaves_the_cache_as_it_was():
    model = tiny_model()
    history = _group("video", 0, CLEAN, GT, seed=1)
    noisy = _group("video", 1, NOISY, TRANSIENT, seed=2)
    executing = _group("action", 1, CLEAN, TRANSIENT, seed=3)

    plain, with_actions = _cached_model(model), _cached_model(model)
    for cached in (plain, with_actions):
        cached.forward([history])
    before = [(g.write_id, g.size) for g in with_actions.cache.groups()]
    alone = plain.forward([noisy])[0]
    fdm = TokenGroup("video", 1, NOISY_FDM, noisy.tokens, noisy.timesteps, noisy.positions, TRANSIENT)
    grounded = with_actions.forward([executing, fdm])[1]
    assert not torch.allclose(alone, grounded)  # the forward-dynamics query saw the transient actions
    assert [(g.write_id, g.size) for g in with_actions.cache.groups()] == before


def test_cached_tokens_of_a_later_chunk_id_stay_hidden_from_clean_queries():
    # Clean video of chunk 1 (chunk id 2) must not see clean actions of chunk 1 (chunk id 3), even
    # when those sit in the cache already.
    model = tiny_model()
    actions = _group("action", 1, CLEAN, GT, seed=4)
    video = _group("video", 1, CLEAN, TRANSIENT, seed=5)
    empty, holding_actions = _cached_model(model), _cached_model(model)
    holding_actions.forward([actions])
    torch.testing.assert_close(holding_actions.forward([video])[0], empty.forward([video])[0])
    later_video = _group("video", 2, NOISY, TRANSIENT, seed=6)
    assert not torch.allclose(holding_actions.forward([later_video])[0], empty.forward([later_video])[0])


def test_freed_slots_are_compacted_so_a_forward_reads_one_view():
    kv = cache(10)
    write(kv, (2, GT), (3, PRED), (2, GT))
    kv.keys[0][:, :7] = torch.arange(7.0)[None, :, None, None]  # slot i holds i
    kv.clear_predicted()  # the middle group goes: the ground truth after it moves down
    assert kv.write_id[:4].tolist() == [0, 0, 2, 2] and bool((kv.write_id[4:] < 0).all())
    assert kv.keys[0][0, :4, 0, 0].tolist() == [0.0, 1.0, 5.0, 6.0]
    reservation = kv.reserve([3], [TRANSIENT], [0])
    current = torch.full((1, 3, *kv.keys[0].shape[2:]), 9.0)
    keys, _ = kv.read_with(0, reservation, current, current)
    assert keys.data_ptr() == kv.keys[0].data_ptr()  # a view of the pool, not a copy
    assert keys[0, :, 0, 0].tolist() == [0.0, 1.0, 5.0, 6.0, 9.0, 9.0, 9.0]
    kv.commit(reservation)


def test_a_forward_longer_than_the_free_scratch_grows_the_pool_and_keeps_the_stored_slots():
    kv = cache(4)
    write(kv, (4, GT))
    kv.keys[0][:, :4] = 1.0
    reservation = kv.reserve([6], [TRANSIENT], [0])
    current = torch.full((kv.keys[0].shape[0], 6, *kv.keys[0].shape[2:]), 2.0)
    keys, values = kv.read_with(0, reservation, current, current)
    assert keys.shape[1] == 10 and bool((keys[:, :4] == 1.0).all()) and bool((keys[:, 4:] == 2.0).all())
    kv.commit(reservation)
