"""Several robots on one server, over real sockets: each connection is a session with its own episode
and KV cache, a cap refuses connections past it, and a disconnect frees the session's cache."""

import gc
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from inference_fixtures import CHUNK, STEPS_PER_FRAME, keyframes, observation, tiny_bundle
from lbva.inference.bundle import load_bundle
from lbva.inference.client import PolicyClient
from lbva.inference.protocol import packb, unpackb
from lbva.inference.server import BackgroundServer, ServerOptions

PROMPTS = ["push the red block", "open the drawer", "stack the cups", "wipe the table"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("sessions"))


def url(server) -> str:
    return f"ws://127.0.0.1:{server.port}"


def drive(port: int, robot: int, chunks: int = 3) -> list[np.ndarray]:
    """One robot's synchronous episode; its prompt and camera images depend on `robot` only."""
    rng = np.random.default_rng(robot)
    with PolicyClient(f"ws://127.0.0.1:{port}") as client:
        client.reset(PROMPTS[robot])
        actions = [client.infer(observation(rng), PROMPTS[robot])]
        for chunk in range(chunks - 1):
            client.feedback(keyframes(rng, chunk), actions[-1])
            actions.append(client.infer(observation(rng), PROMPTS[robot]))
    return actions


def wait_for_sessions(server, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(server.server.sessions) != count:
        assert time.monotonic() < deadline, f"{len(server.server.sessions)} sessions open, expected {count}"
        time.sleep(0.02)


SCHEDULINGS = {"one_at_a_time": dict(batch_sessions=False, parallel_requests=1),
               "parallel": dict(batch_sessions=False, parallel_requests=4),
               # A generous wait, so the robots' forwards meet in shared model calls.
               "batched": dict(batch_sessions=True, batch_wait_ms=200)}


@pytest.mark.parametrize("scheduling", SCHEDULINGS)
def test_four_concurrent_sessions_give_the_actions_of_four_separate_servers(bundle, scheduling):
    separate = []
    for robot in range(4):
        with BackgroundServer(load_bundle(bundle).runtime(), ServerOptions(port=0, max_sessions=1)) as alone:
            separate.append(drive(alone.port, robot))
    options = ServerOptions(port=0, max_sessions=4, **SCHEDULINGS[scheduling])
    with BackgroundServer(load_bundle(bundle).runtime(), options) as shared:
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda robot: drive(shared.port, robot), range(4)))
    assert not np.allclose(separate[0][0], separate[1][0])  # the robots' episodes differ
    used = shared.server.scheduling
    if scheduling != "batched":  # every forward as a session alone runs it: the numbers bit for bit
        assert used.batcher is None
        if scheduling == "parallel":
            assert used.most_at_once >= 2  # some requests of different robots ran at the same time
        for robot in range(4):
            for expected, served in zip(separate[robot], together[robot], strict=True):
                np.testing.assert_array_equal(served, expected)
        return
    assert used.batcher.stats.largest >= 2  # some forwards of different robots shared a call
    # Shared model calls' larger matrix products may round differently: equal within float rounding
    # (about 1e-5 here, after guidance 5 and the robots feeding the served actions back as
    # executed), not bit for bit.
    for robot in range(4):
        for expected, served in zip(separate[robot], together[robot], strict=True):
            np.testing.assert_allclose(served, expected, atol=1e-4, rtol=0)


def test_the_cap_refuses_a_fifth_session_and_the_others_keep_serving(bundle):
    rng = np.random.default_rng(0)
    with BackgroundServer(load_bundle(bundle).runtime(), ServerOptions(port=0, max_sessions=4)) as server:
        clients = [PolicyClient(url(server)) for _ in range(4)]
        try:
            for client, prompt in zip(clients, PROMPTS):
                client.reset(prompt)
            with pytest.raises(InvalidStatus) as refused:
                PolicyClient(url(server))
            assert refused.value.response.status_code == 503
            assert b"maximum of 4 sessions" in refused.value.response.body
            for client, prompt in zip(clients, PROMPTS):
                assert client.infer(observation(rng), prompt).shape == (2, CHUNK, STEPS_PER_FRAME)
        finally:
            for client in clients:
                client.close()
        wait_for_sessions(server, 0)
        with PolicyClient(url(server)) as client:  # a freed place takes a new robot
            assert "server_timing" in client.reset(PROMPTS[0])


def test_a_client_that_disconnects_mid_request_frees_its_cache(bundle):
    with BackgroundServer(load_bundle(bundle).runtime(), ServerOptions(port=0, max_sessions=1)) as server:
        with connect(url(server), max_size=None) as connection:
            unpackb(connection.recv())
            connection.send(packb({"reset": True, "prompt": PROMPTS[0]}))
            connection.recv()
            (runtime,) = server.server.sessions.values()
            cache = weakref.ref(runtime.cache)
            del runtime
            connection.send(packb({"obs": observation(np.random.default_rng(0))}))  # and leave at once
        wait_for_sessions(server, 0)
        gc.collect()
        assert cache() is None
        assert len(drive(server.port, 1, chunks=1)) == 1  # the one place is free again


def test_a_reset_releases_the_cache_memory_until_the_next_forward(bundle):
    runtime = load_bundle(bundle).runtime()
    runtime.reset(PROMPTS[0])
    runtime.infer(observation(np.random.default_rng(0)))
    assert runtime.cache.allocated
    runtime.reset(PROMPTS[1])
    assert not runtime.cache.allocated


def test_sessions_share_the_weights(bundle):
    runtime = load_bundle(bundle).runtime()
    other = runtime.new_session()
    assert other.model is runtime.model and other.cache is not runtime.cache
    assert other.cameras is not runtime.cameras and other.prompts is runtime.prompts
