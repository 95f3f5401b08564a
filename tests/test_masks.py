"""The attention mask rules of spec 2.3, against a brute-force reference written from the spec."""

import itertools

import pytest
import torch

from lbva.models.attention import flex_kernel, prefix_sdpa_kernel, sdpa_kernel
from lbva.models.masks import (
    CLEAN, NOISY, NOISY_FDM, PADDING, TokenLayout, dense_cross_attention_mask, dense_self_attention_mask,
    flex_cross_attention_mask, flex_self_attention_mask,
)


def reference_allowed(sid, fid, role, window, q, k) -> bool:
    """Spec 2.3, one pair at a time."""
    if sid[q] == PADDING:
        return q == k
    if sid[k] != sid[q] or abs(fid[q] - fid[k]) > window:
        return False
    if role[q] == CLEAN:
        return role[k] == CLEAN and fid[k] <= fid[q]
    if role[k] == CLEAN:
        return fid[k] < fid[q] or (role[q] == NOISY_FDM and fid[k] == fid[q] + 1)
    return role[k] == role[q] and fid[k] == fid[q]


def random_layout(generator, length=70, samples=3, window=None):
    sid = torch.randint(-1, samples, (1, length), generator=generator)
    frame = torch.randint(0, 9, (1, length), generator=generator)
    video = torch.rand(1, length, generator=generator) < 0.6
    chunk = int(torch.randint(1, 5, (1,), generator=generator))
    fid = 2 * (frame // chunk) + (~video).long()
    role = torch.randint(0, 2, (1, length), generator=generator)
    role = torch.where(video & (torch.rand(1, length, generator=generator) < 0.2), NOISY_FDM, role)
    if window is None:
        window = int(torch.randint(0, 12, (1,), generator=generator))
    return TokenLayout(sample_id=sid, chunk_id=fid, role=role, window=window)


@pytest.mark.parametrize("seed", range(8))
def test_dense_mask_equals_the_brute_force_reference(seed):
    layout = random_layout(torch.Generator().manual_seed(seed))
    mask = dense_self_attention_mask(layout)[0, 0]
    sid, fid, role = (t[0].tolist() for t in (layout.sample_id, layout.chunk_id, layout.role))
    for q, k in itertools.product(range(layout.length), repeat=2):
        assert bool(mask[q, k]) == reference_allowed(sid, fid, role, layout.window, q, k), (q, k)


def _one_sample_layout(frames: int, chunk: int, window: int = 64):
    """One video and one action token per frame, noisy and clean copies; returns the layout and
    an index lookup (modality, role, frame) -> token position."""
    tokens = [(m, r, f) for m in ("video", "action") for r in (NOISY, CLEAN) for f in range(frames)]
    fid = [2 * (f // chunk) + (m == "action") for m, _, f in tokens]
    layout = TokenLayout(
        sample_id=torch.zeros(1, len(tokens), dtype=torch.long),
        chunk_id=torch.tensor([fid]),
        role=torch.tensor([[r for _, r, _ in tokens]]),
        window=window,
    )
    return layout, {t: i for i, t in enumerate(tokens)}


def _visible(layout, index, query):
    mask = dense_self_attention_mask(layout)[0, 0]
    return {key for key, i in index.items() if mask[index[query], i]}


def test_noisy_video_chunk_sees_earlier_clean_history_and_itself_only():
    layout, index = _one_sample_layout(frames=4, chunk=2)
    seen = _visible(layout, index, ("video", NOISY, 2))
    assert seen == {
        ("video", CLEAN, 0), ("video", CLEAN, 1), ("action", CLEAN, 0), ("action", CLEAN, 1),
        ("video", NOISY, 2), ("video", NOISY, 3),
    }


def test_noisy_action_chunk_sees_the_clean_video_of_its_own_chunk():
    layout, index = _one_sample_layout(frames=4, chunk=2)
    seen = _visible(layout, index, ("action", NOISY, 2))
    assert ("video", CLEAN, 3) in seen and ("video", CLEAN, 2) in seen
    assert ("action", CLEAN, 2) not in seen and ("action", CLEAN, 1) in seen
    assert ("video", NOISY, 2) not in seen


def test_clean_tokens_never_see_noisy_ones():
    layout, index = _one_sample_layout(frames=4, chunk=1)
    for query in index:
        if query[1] == CLEAN:
            assert all(key[1] == CLEAN for key in _visible(layout, index, query))


def test_window_limits_how_far_back_a_token_sees():
    layout, index = _one_sample_layout(frames=6, chunk=1, window=2)
    seen = _visible(layout, index, ("video", CLEAN, 5))
    assert ("video", CLEAN, 4) in seen and ("video", CLEAN, 3) not in seen


def test_tokens_of_different_samples_never_meet():
    layout = TokenLayout(
        sample_id=torch.tensor([[0, 0, 1, 1]]), chunk_id=torch.tensor([[0, 0, 0, 0]]),
        role=torch.full((1, 4), CLEAN), window=8,
    )
    mask = dense_self_attention_mask(layout)[0, 0]
    assert not mask[:2, 2:].any() and not mask[2:, :2].any()


def test_cross_attention_sees_only_the_own_samples_text():
    mask = dense_cross_attention_mask(torch.tensor([[0, 1, PADDING]]), torch.tensor([[0, 0, 1, 1]]))[0, 0]
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True], [True, True, True, True]]


@pytest.mark.parametrize("seed", range(3))
def test_flex_attention_forward_equals_dense_sdpa(seed):
    generator = torch.Generator().manual_seed(seed)
    layout = random_layout(generator, length=200, samples=2, window=6)
    q, k, v = (torch.randn(1, 200, 2, 16, generator=generator) for _ in range(3))
    dense = sdpa_kernel(dense_self_attention_mask(layout))(q, k, v)
    flex = flex_kernel(flex_self_attention_mask(layout), compiled=False)(q, k, v)
    real = layout.sample_id[0] != PADDING
    assert torch.allclose(flex[:, real], dense[:, real], atol=1e-5, rtol=0)


def _cross_attention_case(seed: int, queries: int):
    """Token sample ids [1, 200] with padding, text sample ids [1, 24], and q of the first `queries`
    tokens with k, v of the text."""
    generator = torch.Generator().manual_seed(seed)
    token_sample = torch.randint(-1, 3, (1, 200), generator=generator)
    text_sample = torch.arange(3).repeat_interleave(8)[None]
    q = torch.randn(1, queries, 2, 16, generator=generator)
    k, v = (torch.randn(1, 24, 2, 16, generator=generator) for _ in range(2))
    return token_sample, text_sample, q, k, v


@pytest.mark.parametrize("queries", [200, 136])
def test_a_cross_attention_mask_of_all_tokens_serves_any_query_prefix(queries):
    token_sample, text_sample, q, k, v = _cross_attention_case(0, queries)
    whole = prefix_sdpa_kernel(dense_cross_attention_mask(token_sample, text_sample))(q, k, v)
    own = sdpa_kernel(dense_cross_attention_mask(token_sample[:, :queries], text_sample))(q, k, v)
    assert torch.equal(whole, own)


@pytest.mark.parametrize("queries", [200, 136])
def test_flex_cross_attention_of_a_query_prefix_equals_dense_sdpa(queries):
    token_sample, text_sample, q, k, v = _cross_attention_case(1, queries)
    dense = sdpa_kernel(dense_cross_attention_mask(token_sample[:, :queries], text_sample))(q, k, v)
    flex = flex_kernel(flex_cross_attention_mask(token_sample, text_sample), compiled=False, prefix=True)(q, k, v)
    assert torch.allclose(flex, dense, atol=1e-5, rtol=0)
