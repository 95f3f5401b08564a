"""The KV-cache runtime gives the numbers of a cache-free loop that recomputes the whole history."""

import numpy as np
import pytest

from inference_fixtures import (
    PROMPT, CacheFreeLoop, Segment, denormalize, keyframes, observation, reference_sigmas, runtime, tiled_latents,
    tiny_model, tokens_of,
)
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM

ATOL = 2e-5


@pytest.mark.parametrize("preset", ["tiny-mot", "tiny-shared"])
def test_first_chunk_equals_a_direct_euler_loop_with_guidance(preset):
    model = tiny_model(preset)
    policy = runtime(model, video_guidance=3.0, action_guidance=2.0)
    first = observation(np.random.default_rng(0))
    policy.reset(PROMPT)
    served = policy.infer(first)

    reference = CacheFreeLoop(model, PROMPT, policy.settings)
    reference.video(0, NOISY, policy.settings.video_steps, first=tokens_of(tiled_latents([first]))[:8])
    expected = denormalize(reference.actions(0))
    assert served.shape == (2, 2, 4)
    assert np.abs(expected).max() > 0.1  # not trivially zero
    np.testing.assert_allclose(served, expected, atol=ATOL)


def test_second_chunk_after_feedback_equals_recomputing_the_history():
    model = tiny_model()
    policy = runtime(model)
    rng = np.random.default_rng(1)
    first = observation(rng)
    policy.reset(PROMPT)
    chunk0 = policy.infer(first)
    frames = keyframes(rng, 0)
    policy.feedback(frames, chunk0)
    chunk1 = policy.infer()

    reference = CacheFreeLoop(model, PROMPT, policy.settings)
    first_tokens = tokens_of(tiled_latents([first]))[:8]
    reference.video(0, NOISY, policy.settings.video_steps, first=first_tokens)
    np.testing.assert_allclose(chunk0, denormalize(reference.actions(0)), atol=ATOL)
    reference.ground_truth(0, tokens_of(tiled_latents([first] + frames)), chunk0)
    reference.video(1, NOISY, policy.settings.video_steps)
    np.testing.assert_allclose(chunk1, denormalize(reference.actions(1)), atol=ATOL)


def test_async_feedback_reimagines_the_chunk_in_flight_from_its_actions():
    model = tiny_model()
    policy = runtime(model)
    rng = np.random.default_rng(2)
    first = observation(rng)
    policy.reset(PROMPT)
    chunk0 = policy.infer(first)
    chunk1 = policy.infer()  # predicted while chunk 0 executes
    frames = keyframes(rng, 0)
    policy.feedback(frames, chunk0)  # chunk 1 is executing now
    chunk2 = policy.infer()

    s = policy.settings
    reference = CacheFreeLoop(model, PROMPT, s)
    reference.video(0, NOISY, s.video_steps, first=tokens_of(tiled_latents([first]))[:8])
    reference.actions(0)
    reference.video(1, NOISY, s.video_steps)
    actions1 = reference.actions(1)
    np.testing.assert_allclose(chunk1, denormalize(actions1), atol=ATOL)
    reference.ground_truth(0, tokens_of(tiled_latents([first] + frames)), chunk0)
    executing = Segment("action", 1, CLEAN, actions1, 0.0)
    reference.video(1, NOISY_FDM, s.fdm_steps, context=[executing])  # one forward-dynamics pass
    reference.predicted_actions(1, actions1)  # kept from here on, beside the re-imagined z_1
    reference.video(2, NOISY, s.video_steps)
    np.testing.assert_allclose(chunk2, denormalize(reference.actions(2)), atol=ATOL)


def test_partial_denoising_caches_the_latent_at_its_stop_level():
    model = tiny_model()
    steps = 5
    stop_index = 2
    stop_sigma = reference_sigmas(steps, 5.0)[stop_index]
    policy = runtime(model, video_steps=steps, video_stop_sigma=stop_sigma)
    first = observation(np.random.default_rng(3))
    policy.reset(PROMPT)
    served = policy.infer(first)

    reference = CacheFreeLoop(model, PROMPT, policy.settings)
    reference.video(0, NOISY, steps, stop_index=stop_index, first=tokens_of(tiled_latents([first]))[:8])
    assert reference.history[-1].sigma == pytest.approx(stop_sigma)
    np.testing.assert_allclose(served, denormalize(reference.actions(0)), atol=ATOL)


def test_partial_denoising_with_stop_level_zero_is_full_denoising():
    model = tiny_model()
    first = observation(np.random.default_rng(4))
    results = []
    for settings in ({}, {"video_stop_sigma": 0.0}):
        policy = runtime(model, **settings)
        policy.reset(PROMPT)
        results.append(policy.infer(first))
    np.testing.assert_array_equal(results[0], results[1])
    partial = runtime(model, video_stop_sigma=0.5)
    partial.reset(PROMPT)
    assert not np.allclose(partial.infer(first), results[0])


def test_episodes_are_reproducible_after_reset():
    model = tiny_model()
    policy = runtime(model)
    first = observation(np.random.default_rng(5))
    policy.reset(PROMPT)
    once = policy.infer(first)
    policy.reset(PROMPT)
    assert len(policy.cache.groups()) == 0
    np.testing.assert_array_equal(policy.infer(first), once)


def test_the_cache_counts_one_self_attention_call_per_depth():
    model = tiny_model()
    policy = runtime(model)
    policy.reset(PROMPT)
    policy.infer(observation(np.random.default_rng(6)))
    original = model.blocks[0].joint_forward

    def twice(*args):
        original(*args)
        return original(*args)

    model.blocks[0].joint_forward = twice
    stored = [(g.write_id, g.size) for g in policy.cache.groups()]
    with pytest.raises(RuntimeError, match="self-attention"):
        policy.infer()
    assert [(g.write_id, g.size) for g in policy.cache.groups()] == stored  # the failed forward left nothing
