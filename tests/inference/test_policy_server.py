"""The websocket server on localhost: whole episodes as the reference clients drive them, /healthz,
the bearer token, size limits, and malformed requests that get an error while the server keeps serving."""

import urllib.request

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from inference_fixtures import CHUNK, PROMPT, STEPS_PER_FRAME, keyframes, observation, tiny_bundle
from lbva.inference.bundle import load_bundle
from lbva.inference.client import PolicyClient, ServerError
from lbva.inference.protocol import packb, unpackb
from lbva.inference.server import BackgroundServer, ServerOptions

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(bundle):
    with BackgroundServer(load_bundle(bundle).runtime(), ServerOptions(port=0)) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(bundle):
    """With a bearer token and a 256 KiB message limit."""
    options = ServerOptions(port=0, token=TOKEN, max_message_bytes=256 << 10)
    with BackgroundServer(load_bundle(bundle).runtime(), options) as running:
        yield running


def url(server) -> str:
    return f"ws://127.0.0.1:{server.port}"


def robotwin_observation(rng) -> dict:
    """What the reference client puts in `obs`: camera images, the joint state and the task text."""
    return {**observation(rng), "observation.state": rng.normal(size=14).astype(np.float32), "task": PROMPT}


def test_a_reference_client_drives_a_synchronous_episode_over_the_socket(bundle, server):
    rng = np.random.default_rng(0)
    local = load_bundle(bundle).runtime()
    local.reset(PROMPT)
    with PolicyClient(url(server)) as client:
        assert client.metadata == {}
        assert set(client.reset(PROMPT)) == {"server_timing"}
        first = robotwin_observation(rng)
        reply = client.call({"obs": first, "prompt": PROMPT, "save_visualization": False,
                             "video_guidance_scale": 5.0, "action_guidance_scale": 1.0})
        assert set(reply["server_timing"]) == {"infer_ms", "prev_total_ms"}
        actions = reply["action"]
        assert actions.shape == (2, CHUNK, STEPS_PER_FRAME) and actions.dtype == np.float32
        np.testing.assert_allclose(actions, local.infer(first), atol=1e-6)
        for chunk in range(3):
            frames = [{**frame, "task": PROMPT} for frame in keyframes(rng, chunk)]
            assert set(client.feedback(frames, actions)) == {"server_timing"}
            local.feedback(frames, actions.astype(np.float64))
            actions = client.infer(robotwin_observation(rng), PROMPT)
            np.testing.assert_allclose(actions, local.infer(), atol=1e-6)


def test_an_asynchronous_client_asks_for_the_next_chunk_before_feeding_back(bundle, server):
    rng = np.random.default_rng(1)
    local = load_bundle(bundle).runtime()
    local.reset(PROMPT)
    with PolicyClient(url(server)) as client:
        client.reset(PROMPT)
        first = observation(rng)
        executing = client.infer(first, PROMPT)
        np.testing.assert_allclose(executing, local.infer(first), atol=1e-6)
        following = client.infer(first, PROMPT)  # predicted while `executing` runs
        np.testing.assert_allclose(following, local.infer(), atol=1e-6)
        for chunk in range(3):
            frames = keyframes(rng, chunk)
            client.feedback(frames, executing)  # the robot has moved on to `following`
            local.feedback(frames, executing.astype(np.float64))
            executing, following = following, client.infer(first, PROMPT)
            np.testing.assert_allclose(following, local.infer(), atol=1e-6)


def test_healthz_answers_ok(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
        assert response.status == 200 and response.read() == b"OK\n"


def _ndarray(data: bytes, dtype: str, shape: list) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _raw(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _image(shape=(64, 64, 3), dtype=np.uint8) -> np.ndarray:
    return np.zeros(shape, dtype)


CAMERA = "observation.images.top"
MALFORMED = {
    "not msgpack": b"\xc1\xc1garbage",
    "not a map": packb([1, 2, 3]),
    "prompt of the wrong type": packb({"reset": True, "prompt": 7}),
    "flag of the wrong type": packb({"reset": "yes", "prompt": "x"}),
    "unknown top-level key": packb({"reset": True, "prompt": "x", "temperature": 0.3}),
    "unknown observation key": packb({"obs": {"depth": _image()}}),
    "obs of the wrong type": packb({"obs": [_image()]}),
    "object dtype": _raw({"obs": {CAMERA: _ndarray(b"\x00" * 8, "|O", [1])}}),
    "complex dtype": _raw({"obs": {CAMERA: _ndarray(b"\x00" * 16, "<c16", [1])}}),
    "structured dtype": _raw({"obs": {CAMERA: _ndarray(b"\x00" * 8, "[('a', '<f8')]", [1])}}),
    "data shorter than its shape": _raw({"obs": {CAMERA: _ndarray(b"\x00" * 10, "|u1", [64, 64, 3])}}),
    "oversized image": packb({"obs": {CAMERA: _image((5000, 8, 3))}}),
    "image of floats": packb({"obs": {CAMERA: _image(dtype=np.float32)}}),
    "state of the wrong type": packb({"compute_kv_cache": True, "obs": [], "state": "actions"}),
    "state of the wrong shape": packb({"compute_kv_cache": True, "obs": [], "state": np.zeros((2, 9, 9))}),
    "imagine": packb({"compute_kv_cache": True, "obs": [], "state": np.zeros((2, 2, 4)), "imagine": True}),
    "reset and feedback at once": packb({"reset": True, "compute_kv_cache": True, "prompt": "x"}),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_request_gets_an_error_and_the_connection_keeps_serving(server, name):
    with connect(url(server), max_size=None) as connection:
        unpackb(connection.recv())
        connection.send(packb({"reset": True, "prompt": PROMPT}))
        connection.recv()
        connection.send(MALFORMED[name])
        answer = connection.recv()
        assert isinstance(answer, str) and answer.startswith("error: ")
        connection.send(packb({"obs": observation(np.random.default_rng(0))}))  # a valid request still works
        assert unpackb(connection.recv())["action"].shape == (2, CHUNK, STEPS_PER_FRAME)


def test_requests_out_of_episode_order_get_errors(server):
    with PolicyClient(url(server)) as client:
        client.reset(PROMPT)
        with pytest.raises(ServerError, match="no chunk awaits feedback"):
            client.feedback(keyframes(np.random.default_rng(0), 0), np.zeros((2, CHUNK, STEPS_PER_FRAME)))
        with pytest.raises(ServerError, match="needs every camera"):
            client.infer({"task": PROMPT}, PROMPT)
        actions = client.infer(observation(np.random.default_rng(0)), PROMPT)
        with pytest.raises(ServerError, match="keyframes"):
            client.feedback([], actions)
        client.feedback(keyframes(np.random.default_rng(1), 0), actions)


def test_a_text_frame_gets_an_error(server):
    with connect(url(server)) as connection:
        connection.recv()
        connection.send("reset")
        assert connection.recv().startswith("error: ")


@pytest.mark.parametrize("scheme", ["Bearer", "Api-Key"])
def test_without_the_token_the_handshake_is_refused(guarded, scheme):
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        with pytest.raises(InvalidStatus) as refused:
            PolicyClient(url(guarded), token=token, token_scheme=scheme)
        assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        PolicyClient(url(guarded), token=TOKEN, token_scheme="Basic")
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize("scheme", ["Bearer", "Api-Key", "api-key"])
def test_both_token_forms_are_accepted(guarded, scheme):
    """The reference client sends 'Authorization: Api-Key <key>'; other clients send Bearer."""
    with PolicyClient(url(guarded), token=TOKEN, token_scheme=scheme) as client:
        assert "server_timing" in client.reset(PROMPT)


def test_a_message_over_the_size_limit_closes_only_that_connection(guarded):
    with PolicyClient(url(guarded), token=TOKEN) as client:
        with pytest.raises(ConnectionClosedError) as closed:
            client.call({"obs": {CAMERA: _image((512, 512, 3))}})  # 768 KiB > 256 KiB
        assert closed.value.rcvd.code == 1009
    with PolicyClient(url(guarded), token=TOKEN) as client:
        assert "server_timing" in client.reset(PROMPT)


def test_a_server_failure_closes_the_connection_and_the_server_keeps_serving(bundle):
    runtime = load_bundle(bundle).runtime()

    def broken(observation=None):
        raise RuntimeError("the GPU fell off")

    runtime.infer = broken
    runtime.new_session = lambda batcher=None: runtime  # every session gets the broken runtime
    with BackgroundServer(runtime, ServerOptions(port=0)) as running:
        with PolicyClient(url(running)) as client:
            client.reset(PROMPT)
            with pytest.raises(ServerError, match="internal error: RuntimeError: the GPU fell off"):
                client.infer(observation(np.random.default_rng(0)), PROMPT)
            with pytest.raises(ConnectionClosedError) as closed:
                client.reset(PROMPT)
            assert closed.value.rcvd.code == 1011
        with PolicyClient(url(running)) as client:
            assert "server_timing" in client.reset(PROMPT)


@pytest.mark.parametrize("host, token, warned", [
    ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False),
    ("0.0.0.0", None, True), ("10.1.2.3", None, True), ("robots.lab", None, True), ("0.0.0.0", "secret", False),
])
def test_serving_beyond_this_machine_without_a_token_is_warned_about(host, token, warned):
    from lbva.inference.cli import exposure_warning

    warning = exposure_warning(host, token)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "--token-file" in warning
