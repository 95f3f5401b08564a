"""msgpack + numpy payloads in the reference's layout, and request parsing."""

import msgpack
import numpy as np
import pytest

from lbva.inference.protocol import Feedback, Infer, ProtocolError, Reset, packb, parse_request, unpackb

CAMERAS = ["cam"]


def test_arrays_and_numpy_scalars_round_trip_in_the_reference_layout():
    message = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.uint8(7), np.bool_(True)],
               "c": {"d": np.zeros((0, 4), np.int64)}, "e": "text"}
    raw = msgpack.unpackb(packb(message), raw=False, strict_map_key=False)
    assert raw["a"] == {b"__ndarray__": True, b"data": message["a"].tobytes(), b"dtype": "<f4", b"shape": [2, 3]}
    assert raw["b"][0] == {b"__npgeneric__": True, b"data": 7, b"dtype": "|u1"}
    decoded = unpackb(packb(message))
    np.testing.assert_array_equal(decoded["a"], message["a"])
    assert decoded["b"][0] == 7 and decoded["b"][0].dtype == np.uint8 and decoded["b"][1] == np.True_
    assert decoded["c"]["d"].shape == (0, 4) and decoded["e"] == "text"


@pytest.mark.parametrize("value", [np.array([1 + 2j]), np.array([object()], dtype=object)])
def test_complex_and_object_arrays_are_not_sent(value):
    with pytest.raises(ValueError):
        packb({"x": value})


def test_the_three_request_kinds():
    image = np.zeros((8, 8, 3), np.uint8)
    assert parse_request({"reset": True, "prompt": "go", "save_visualization": False}, CAMERAS) == Reset("go")
    infer = parse_request({"obs": {"cam": image, "task": "go", "observation.state": np.zeros(3)}, "prompt": "go",
                           "video_guidance_scale": 5.0}, CAMERAS)
    assert isinstance(infer, Infer) and list(infer.observation) == ["cam"]
    feedback = parse_request({"compute_kv_cache": True, "obs": [{"cam": image}] * 4, "imagine": False,
                              "state": np.zeros((2, 2, 4), np.float32)}, CAMERAS)
    assert isinstance(feedback, Feedback) and len(feedback.keyframes) == 4 and feedback.executed.dtype == np.float64


def test_later_infers_may_leave_the_images_out_but_keyframes_may_not():
    assert parse_request({"obs": {"task": "go"}}, CAMERAS).observation == {}
    with pytest.raises(ProtocolError, match="camera 'cam' is missing"):
        parse_request({"compute_kv_cache": True, "obs": [{"task": "go"}], "state": np.zeros((2, 2, 4))}, CAMERAS)


def test_executed_actions_must_be_finite():
    with pytest.raises(ProtocolError, match="NaN"):
        parse_request({"compute_kv_cache": True, "obs": [], "state": np.full((2, 2, 4), np.nan)}, CAMERAS)
