"""The savings of issue #14 item 3 leave the numbers as they were: the prompt's work once per episode
and the prompt row alone in an unguided action loop give the actions (and cache) of full forwards."""

import numpy as np
import pytest
import torch

from inference_fixtures import PROMPT, keyframes, observation, runtime, tiny_model
from lbva.inference.cached_forward import CachedModel, EpisodeText, EpisodeTimesteps, TokenGroup, _EpisodeCrossAttention
from lbva.inference.kv_cache import KVCache, WriteMode
from lbva.models.attention import AttentionKernels
from lbva.models.masks import NOISY
from lbva.models.mot import ModelInputs

ATOL = 1e-6


def _episode(policy, shortcuts: bool, asynchronous: bool, chunks: int = 4, fold: bool = False) -> list[np.ndarray]:
    """Actions of one episode (sync or async control) with the shortcuts on or off (and the padding
    fold, which rounds differently, off unless asked for). The robot reports fixed executed actions,
    so both runs get the same inputs (rounding differences of the served actions would otherwise
    come back as input)."""
    policy.sampler.shortcuts = shortcuts
    policy.sampler.fold_padding = fold
    rng = np.random.default_rng(3)
    policy.reset(PROMPT)
    first = observation(rng)
    executing = policy.infer(first)
    out = [executing]
    following = policy.infer() if asynchronous else None
    if asynchronous:
        out.append(following)
    for chunk in range(chunks):
        policy.feedback(keyframes(rng, chunk), rng.normal(size=executing.shape))
        predicted = policy.infer()
        out.append(predicted)
        executing, following = (following, predicted) if asynchronous else (predicted, None)
    return out


def _stored_keys(cache: KVCache) -> list[torch.Tensor]:
    """Per depth the K of the stored slots (compacted at the front; the scratch after them is not state)."""
    stored = int((cache.write_id >= 0).sum())
    return [keys[:, :stored].clone() for keys in cache.keys]


@pytest.mark.parametrize("preset", ["tiny-mot", "tiny-shared"])
def test_shortcuts_give_the_actions_of_full_forwards(preset):
    policy = runtime(tiny_model(preset), video_guidance=5.0, action_guidance=1.0, attention_window=4)
    full = _episode(policy, shortcuts=False, asynchronous=False)
    full_cache = _stored_keys(policy.cache)
    fast = _episode(policy, shortcuts=True, asynchronous=False)
    assert np.abs(full[-1]).max() > 0.1
    for expected, served in zip(full, fast, strict=True):
        np.testing.assert_allclose(served, expected, rtol=0, atol=ATOL)
    for expected, stored in zip(full_cache, _stored_keys(policy.cache), strict=True):
        torch.testing.assert_close(stored, expected, rtol=0, atol=ATOL)


def test_the_prompt_work_once_per_episode_is_exact_in_asynchronous_control():
    """Reusing the episode's text K/V changes no bit, also through forward-dynamics re-imagination."""
    policy = runtime(tiny_model(), video_guidance=5.0, action_guidance=2.0, attention_window=4)
    full = _episode(policy, shortcuts=False, asynchronous=True)
    fast = _episode(policy, shortcuts=True, asynchronous=True)
    for expected, served in zip(full, fast, strict=True):
        np.testing.assert_array_equal(served, expected)


def test_asynchronous_control_with_the_prompt_row_alone_stays_within_rounding():
    """The prompt-row-only action forward differs from row 0 of the two-row one by float rounding
    (a GEMM of half the rows, ~2e-7). Asynchronous control caches its own predicted actions and
    re-imagines video from them under video guidance 5, which amplifies that rounding over chunks
    (~1e-5 after 4 chunks); the per-forward equality is the test below."""
    policy = runtime(tiny_model(), video_guidance=5.0, action_guidance=1.0, attention_window=4)
    full = _episode(policy, shortcuts=False, asynchronous=True)
    fast = _episode(policy, shortcuts=True, asynchronous=True)
    for expected, served in zip(full, fast, strict=True):
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-mot", "tiny-shared"])
def test_a_forward_over_the_prompt_row_alone_equals_row_0_of_both_rows(preset):
    policy = runtime(tiny_model(preset), video_guidance=5.0, action_guidance=1.0)
    _episode(policy, shortcuts=True, asynchronous=False, chunks=2)  # a cache holding history
    sampler = policy.sampler
    noisy = sampler._action_group(3, torch.randn(sampler.action_tokens_per_chunk, 30), 0.7, NOISY,
                                  WriteMode.TRANSIENT)
    both = sampler._cached.forward([noisy])[0]
    alone = sampler._cached.forward([noisy], rows=1)[0]
    assert alone.shape[0] == 1 and both.shape[0] == 2
    torch.testing.assert_close(alone[0], both[0], rtol=ATOL, atol=ATOL)


def test_guided_actions_keep_both_rows():
    """With action guidance > 1 the negative row is needed: the shortcuts only reuse the prompt's work."""
    policy = runtime(tiny_model(), video_guidance=3.0, action_guidance=2.0)
    full = _episode(policy, shortcuts=False, asynchronous=False, chunks=2)
    fast = _episode(policy, shortcuts=True, asynchronous=False, chunks=2)
    for expected, served in zip(full, fast, strict=True):
        np.testing.assert_allclose(served, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("preset", ["tiny-mot", "tiny-shared"])
def test_each_noise_level_is_embedded_once_and_gives_the_models_own_numbers(preset):
    """EpisodeTimesteps: a stream whose tokens share a level gets one broadcast row, a mixed one a
    row per token; either way the forward's outputs are bit for bit those of the model embedding
    every token itself, and a level met again is not embedded again."""
    model = tiny_model(preset)
    config = model.config
    torch.manual_seed(1)
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    kernels = AttentionKernels(sdpa, sdpa)
    video_levels = torch.cat([torch.zeros(2, 16), torch.full((2, 16), 700.0)], dim=1)  # clean history + noisy
    inputs = ModelInputs(
        video_tokens=torch.randn(2, 32, config.video_token_dim), video_timesteps=video_levels,
        video_positions=torch.randint(0, 4, (2, 32, 3)), action_tokens=torch.randn(2, 8, config.action_dim),
        action_timesteps=torch.full((2, 8), 350.0), action_positions=torch.randint(0, 4, (2, 8, 3)),
        text=torch.randn(2, 5, config.text_dim))
    memo = EpisodeTimesteps(model)
    video, action = memo.of(inputs)
    assert video.proj.shape == (2, 32, 6, config.video_width) and action.proj.shape[:2] == (2, 1)
    with torch.no_grad():
        expected = model(inputs, kernels)
        for got, want in zip(model(inputs, kernels, (video, action)), expected, strict=True):
            assert torch.equal(got, want)
    assert sorted(memo.seen[0]) == [0.0, 700.0] and sorted(memo.seen[1]) == [350.0]
    memo.embedders = (None, None)  # a level seen before is looked up, never embedded again
    assert torch.equal(memo.of(inputs)[1].temb, action.temb)


def test_the_episode_text_holds_one_key_value_pair_per_depth_and_row():
    model = tiny_model()
    config = model.config
    text = EpisodeText.of(model, torch.randn(2, 8, config.text_dim))
    assert len(text.keys) == len(text.values) == config.num_layers and text.rows == 2
    assert text.keys[0].shape == (2, 8, config.num_heads, config.head_dim)
    assert not torch.equal(text.keys[0], text.keys[1])  # each depth projects with its own weights


def test_folding_the_prompt_padding_keeps_the_cross_attention_within_rounding():
    """EpisodeText folds each row's zero padding into one key with bias log n: per forward the same
    attention as over every padding key (1e-6), and over a guided episode within its rounding."""
    model = tiny_model()
    config = model.config
    text = torch.zeros(2, 40, config.text_dim)
    text[0, :5], text[1, :11] = torch.randn(5, config.text_dim), torch.randn(11, config.text_dim)  # two lengths
    folded, full = EpisodeText.of(model, text), EpisodeText.of(model, text, fold_padding=False)
    assert folded.keys[0].shape[1] == 12 and full.keys[0].shape[1] == 40  # 11 prompt tokens + 1
    q = torch.randn(2, 7, config.num_heads, config.head_dim)
    for depth in range(config.num_layers):
        attend = lambda t: _EpisodeCrossAttention(t, rows=2)  # noqa: E731
        kernels = [attend(folded), attend(full)]
        for kernel in kernels:
            kernel.depth = depth
        empty = torch.zeros(2, 0, config.num_heads, config.head_dim)
        torch.testing.assert_close(kernels[0](q, empty, empty), kernels[1](q, empty, empty), rtol=0, atol=1e-6)

    policy = runtime(tiny_model(), video_guidance=5.0, action_guidance=1.0, attention_window=4)
    unfolded = _episode(policy, shortcuts=True, asynchronous=False)
    with_fold = _episode(policy, shortcuts=True, asynchronous=False, fold=True)
    assert policy.sampler._cached.episode_text.bias is not None  # the fold ran
    for expected, served in zip(unfolded, with_fold, strict=True):
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-4)


def test_a_forward_over_the_prompt_row_alone_cannot_store():
    model = tiny_model()
    config = model.config
    cache = KVCache(config.num_layers, 64, batch=2, num_heads=config.num_heads, head_dim=config.head_dim)
    cached = CachedModel(model, cache, torch.randn(2, 8, config.text_dim))
    group = TokenGroup("action", 1, NOISY, torch.zeros(8, 30), torch.zeros(8), torch.zeros(8, 3),
                       WriteMode.PREDICTED)
    with pytest.raises(ValueError, match="cannot store"):
        cached.forward([group], rows=1)


@pytest.mark.parametrize("damage", ["mixed sizes", "missing camera"])
def test_refused_feedback_leaves_the_chunk_in_flight(damage):
    """Feedback that cannot be encoded is refused before it touches the episode: the same feedback,
    corrected, then grounds the chunk exactly as it would have without the refusal."""
    from lbva.inference.runtime import EpisodeError

    outcomes = []
    for refuse_first in (False, True):
        policy = runtime(tiny_model(), video_guidance=1.0, action_guidance=1.0)
        rng = np.random.default_rng(5)
        policy.reset(PROMPT)
        executing = policy.infer(observation(rng))
        frames, executed = keyframes(rng, 0), rng.normal(size=executing.shape)
        if refuse_first:
            bad = [dict(frame) for frame in frames]
            key = next(iter(bad[1]))
            if damage == "mixed sizes":
                bad[1][key] = bad[1][key][:-2]
            else:
                del bad[1][key]
            with pytest.raises(EpisodeError, match="feedback for chunk 0: "):
                policy.feedback(bad, executed)
        policy.feedback(frames, executed)
        outcomes.append(policy.infer())
    np.testing.assert_array_equal(outcomes[0], outcomes[1])
