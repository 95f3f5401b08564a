"""Forwards of several sessions in one model call (inference/batching.py): each session gets its own
predictions, concurrent sessions really share calls, and a failure stays with its session."""

import threading
import time

import numpy as np
import pytest
import torch

from inference_fixtures import PROMPT, keyframes, observation, runtime, tiny_model
from lbva.inference.batching import ForwardBatcher
from lbva.inference.cached_forward import run_batched
from lbva.inference.kv_cache import WriteMode
from lbva.models.masks import CLEAN, NOISY

# Stacking episodes changes the shapes of the matrix products, which may round differently; guidance
# and the served actions fed back as executed carry that rounding on (about 1e-5 measured).
ATOL = 1e-4
PROMPTS = ["push the red block", "open the drawer", "stack the cups", "wipe the table"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _episode(policy, robot: int, chunks: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(robot)
    policy.reset(PROMPTS[robot])
    actions = [policy.infer(observation(rng))]
    for chunk in range(chunks - 1):
        policy.feedback(keyframes(rng, chunk), actions[-1])
        actions.append(policy.infer())
    return actions


def _stored(policy) -> int:
    return int((policy.cache.write_id >= 0).sum())


def _noisy_video(policy, chunk: int, seed: int):
    sampler = policy.sampler
    tokens = torch.randn(sampler.video_tokens_per_chunk, sampler.model.config.video_token_dim,
                         generator=torch.Generator().manual_seed(seed))
    return sampler._video_group(chunk, tokens, 0.7, NOISY, WriteMode.TRANSIENT)


def test_one_call_gives_each_episode_the_predictions_of_its_own_forward(model):
    """Episodes at different points (cache lengths differ), with different prompts and CFG rows."""
    first, second = runtime(model), runtime(model)
    _episode(first, 0, chunks=1)
    _episode(second, 1, chunks=3)
    assert _stored(first) != _stored(second)
    a, b = _noisy_video(first, 1, seed=0), _noisy_video(second, 3, seed=1)
    alone = [first.sampler._cached.forward([a]), second.sampler._cached.forward([b], rows=1)]
    together = run_batched(model, [first.sampler._cached.prepare([a]), second.sampler._cached.prepare([b], rows=1)])
    for solo, shared in zip(alone, together, strict=True):
        assert shared[0].shape == solo[0].shape
        torch.testing.assert_close(shared[0], solo[0], atol=ATOL, rtol=0)
    assert not torch.allclose(together[0][0][0], together[1][0][0])


def test_forwards_of_different_token_counts_are_refused_and_reserve_nothing(model):
    first, second = runtime(model), runtime(model)
    _episode(first, 0, chunks=1)
    _episode(second, 1, chunks=1)
    stored = _stored(first)
    clean = torch.zeros(first.sampler.video_tokens_per_chunk, model.config.video_token_dim)
    write = first.sampler._video_group(1, clean, 0.0, CLEAN, WriteMode.PREDICTED)
    short = second.sampler._action_group(1, torch.zeros(second.sampler.action_tokens_per_chunk, 30), 0.5,
                                         NOISY, WriteMode.TRANSIENT)
    with pytest.raises(ValueError, match="cannot share one call"):
        run_batched(model, [first.sampler._cached.prepare([write]), second.sampler._cached.prepare([short])])
    assert _stored(first) == stored
    assert first.sampler._cached.forward([_noisy_video(first, 1, 0)])  # the cache still works


def test_concurrent_sessions_share_model_calls_and_keep_their_own_actions(model):
    base = runtime(model)
    solo = [_episode(base.new_session(), robot) for robot in range(4)]
    batcher = ForwardBatcher(max_wait_s=0.5)
    sessions = [base.new_session(batcher) for _ in range(4)]
    start = threading.Barrier(4)
    results: list = [None] * 4

    def run(robot: int) -> None:
        with batcher.request():
            start.wait()
            results[robot] = _episode(sessions[robot], robot)

    threads = [threading.Thread(target=run, args=(robot,)) for robot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batcher.stats.largest == 4  # the sessions' loops ran in step, four forwards per call
    assert batcher.stats.calls < batcher.stats.forwards
    for expected, served in zip(solo, results, strict=True):
        for e, s in zip(expected, served, strict=True):
            np.testing.assert_allclose(s, e, atol=ATOL, rtol=0)
    assert not np.allclose(results[0][0], results[1][0])


def test_a_lone_session_never_waits_for_the_others(model):
    batcher = ForwardBatcher(max_wait_s=30.0)  # a wait would show as a 30 s stall
    policy = runtime(model).new_session(batcher)
    idle = batcher.request()
    idle.__enter__()  # another request in progress... that finishes before this one starts
    idle.__exit__(None, None, None)
    started = time.monotonic()
    with batcher.request():
        assert len(_episode(policy, 0, chunks=2)) == 2
    assert time.monotonic() - started < 25.0  # not one forward waited out the 30 s
    assert batcher.stats.largest == 1 and batcher.stats.calls > 2


def test_a_session_whose_request_fails_does_not_hold_up_the_others(model):
    batcher = ForwardBatcher(max_wait_s=30.0)  # the good session must not wait for the failed one
    good, bad = runtime(model).new_session(batcher), runtime(model).new_session(batcher)
    good.reset(PROMPT)  # the bad session never resets: its infer fails before any forward
    errors: dict[str, BaseException] = {}
    start = threading.Barrier(2)

    def run(name, policy) -> None:
        with batcher.request():
            start.wait()
            try:
                policy.infer(observation(np.random.default_rng(0)))
            except Exception as error:  # noqa: BLE001
                errors[name] = error

    threads = [threading.Thread(target=run, args=(name, policy)) for name, policy in (("good", good), ("bad", bad))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads)
    assert "good" not in errors and "no episode" in str(errors["bad"])
