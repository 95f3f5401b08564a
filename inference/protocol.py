"""The websocket payloads of spec 4.4: msgpack with numpy arrays, and the three request kinds.

Arrays travel as maps {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape};
numpy scalars as {b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}. Decoding never
unpickles and builds arrays only of bool, integer and float dtypes (object, void, complex, strings
and structured dtypes are refused before numpy parses them).

Requests, as the reference RoboTwin/LIBERO clients send them:
    reset     {reset: True, prompt: str, save_visualization?}
    infer     {obs: {camera key: H x W x 3 uint8, "observation.state"?, "task"?}, prompt?,
               save_visualization?, video_guidance_scale?, action_guidance_scale?}
    feedback  {compute_kv_cache: True, obs: [obs dict, ...] (keyframes), state: actions [C, K, N],
               imagine?: False, save_visualization?}
    imagine   {imagine: True, obs: {every camera key: H x W x 3 uint8}, prompt: str, chunks: int}
              -> {latents: [z, chunks*K, h, w] float32, action: [chunks, C, K, N] float32
                  (, frames: [chunks*K, H, W, 3] uint8 where the bundle's VAE decodes)}:
              the reference's i2va mode (spec 4.1), a new episode run `chunks` chunks without feedback.
The server uses its own guidance scales (as the reference does) and does not save visualisations;
those fields are checked for type and otherwise ignored, as is any of these keys a request kind
does not use. Any other top-level key is an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

# Byte-order mark, kind (bool, signed, unsigned, float) and item size: nothing numpy must interpret.
_PLAIN_DTYPE = re.compile(r"[<>|=]?[biuf][1248]")
MAX_ARRAY_DIMS = 8
MAX_IMAGE_SIDE = 4096
MAX_KEYFRAMES = 1024
MAX_PROMPT_CHARS = 4096
MAX_IMAGINE_CHUNKS = 256

# Every key the reference clients send, in any request; what a request kind does not use is ignored.
KNOWN_KEYS = {"reset", "prompt", "obs", "state", "compute_kv_cache", "imagine", "save_visualization",
              "video_guidance_scale", "action_guidance_scale", "chunks"}


class ProtocolError(ValueError):
    """A message that is not a valid request; the text goes back to the client."""


def _encode_numpy(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "OVc":
        raise ValueError(f"arrays of dtype {obj.dtype} cannot be sent")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _plain_dtype(text: Any) -> np.dtype:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not isinstance(text, str) or not _PLAIN_DTYPE.fullmatch(text):
        raise ProtocolError(f"array dtype {text!r} is not allowed (only bool, integer and float)")
    return np.dtype(text)


def _decode_numpy(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _plain_dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_ARRAY_DIMS
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ProtocolError(f"array shape {shape!r} must be a list of at most {MAX_ARRAY_DIMS} sizes >= 0")
        if not isinstance(data, bytes) or len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ProtocolError(f"array data does not fill shape {list(shape)} of {dtype}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        value = obj.get(b"data")
        if not isinstance(value, (bool, int, float)):
            raise ProtocolError("numpy scalar data must be a number")
        return _plain_dtype(obj.get(b"dtype")).type(value)
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes of `obj`, numpy arrays and scalars included."""
    return msgpack.packb(obj, default=_encode_numpy, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode a msgpack message; raises ProtocolError on anything malformed or disallowed. Container
    and string lengths are bounded by the message size (msgpack's defaults for unpackb)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_numpy, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise ProtocolError(f"not a valid msgpack message ({type(error).__name__}: {error})") from error


@dataclass(frozen=True)
class Reset:
    prompt: str


@dataclass(frozen=True)
class Infer:
    observation: dict[str, np.ndarray]  # camera key -> H x W x 3 uint8; the cameras sent


@dataclass(frozen=True)
class Feedback:
    keyframes: list[dict[str, np.ndarray]]
    executed: np.ndarray  # [C, K, N] float64


@dataclass(frozen=True)
class Imagine:
    observation: dict[str, np.ndarray]  # every camera: the first frame
    prompt: str
    chunks: int


Request = Reset | Infer | Feedback | Imagine


def parse_request(message: Any, camera_keys: Sequence[str]) -> Request:
    """A decoded message -> the request it is; raises ProtocolError naming what is wrong."""
    if not isinstance(message, dict) or not all(isinstance(k, str) for k in message):
        raise ProtocolError("a request must be a map with string keys")
    reset = _flag(message, "reset")
    feedback = _flag(message, "compute_kv_cache")
    if reset and feedback:
        raise ProtocolError("a request cannot be both reset and compute_kv_cache")
    unknown = sorted(set(message) - KNOWN_KEYS)
    if unknown:
        raise ProtocolError(f"unknown keys {unknown}; requests may hold {sorted(KNOWN_KEYS)}")
    _flag(message, "save_visualization")
    _flag(message, "imagine")
    for name in ("video_guidance_scale", "action_guidance_scale"):
        if name in message and not _is_number(message[name]):
            raise ProtocolError(f"{name} must be a number")
    if reset:
        prompt = message.get("prompt")
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise ProtocolError(f"reset needs 'prompt', a string of at most {MAX_PROMPT_CHARS} characters")
        return Reset(prompt)
    if "prompt" in message and not isinstance(message["prompt"], str):
        raise ProtocolError("prompt must be a string")
    if _flag(message, "imagine") and not feedback:
        return _imagine(message, camera_keys)
    if feedback:
        if _flag(message, "imagine"):
            raise ProtocolError("imagine=True is not supported: feedback needs the observed keyframes")
        frames = message.get("obs")
        if not isinstance(frames, list) or len(frames) > MAX_KEYFRAMES:
            raise ProtocolError(f"feedback needs 'obs', a list of at most {MAX_KEYFRAMES} observation maps")
        state = message.get("state")
        if not isinstance(state, np.ndarray) or state.ndim != 3 or state.dtype.kind not in "iuf":
            raise ProtocolError("feedback needs 'state', the executed actions as a numeric array [C, K, N]")
        if not np.isfinite(state).all():
            raise ProtocolError("state holds NaN or infinite values")
        return Feedback([_observation(frame, camera_keys, i, require_cameras=True) for i, frame in enumerate(frames)],
                        state.astype(np.float64))
    if "obs" not in message:
        raise ProtocolError("infer needs 'obs', the observation map")
    # Only the first infer of an episode uses the images (as in the reference), so they may be left out.
    return Infer(_observation(message["obs"], camera_keys, None, require_cameras=False))


def _imagine(message: dict, camera_keys: Sequence[str]) -> Imagine:
    """An i2va request: a new episode from one observation (every camera) and a prompt."""
    prompt, chunks = message.get("prompt"), message.get("chunks")
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"imagine needs 'prompt', a string of at most {MAX_PROMPT_CHARS} characters")
    if not isinstance(chunks, (int, np.integer)) or isinstance(chunks, bool) or not 1 <= chunks <= MAX_IMAGINE_CHUNKS:
        raise ProtocolError(f"imagine needs 'chunks', an integer in 1..{MAX_IMAGINE_CHUNKS}")
    if "obs" not in message:
        raise ProtocolError("imagine needs 'obs', the first observation map")
    return Imagine(_observation(message["obs"], camera_keys, None, require_cameras=True), prompt, int(chunks))


def _flag(message: dict, key: str) -> bool:
    value = message.get(key, False)
    if not isinstance(value, (bool, np.bool_)):
        raise ProtocolError(f"{key} must be a boolean")
    return bool(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _observation(obs: Any, camera_keys: Sequence[str], index: int | None, require_cameras: bool
                 ) -> dict[str, np.ndarray]:
    """An observation map -> its camera images; other 'observation.*' entries and 'task' are ignored."""
    where = "obs" if index is None else f"obs[{index}]"
    if not isinstance(obs, dict) or not all(isinstance(k, str) for k in obs):
        raise ProtocolError(f"{where} must be a map with string keys")
    unknown = sorted(k for k in obs if k not in camera_keys and k != "task" and not k.startswith("observation."))
    if unknown:
        raise ProtocolError(f"{where}: unknown keys {unknown}; cameras are {list(camera_keys)}")
    images = {}
    for key in camera_keys:
        image = obs.get(key)
        if image is None:
            if require_cameras:
                raise ProtocolError(f"{where}: camera '{key}' is missing")
            continue
        if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3
                or not 0 < image.shape[0] <= MAX_IMAGE_SIDE or not 0 < image.shape[1] <= MAX_IMAGE_SIDE):
            raise ProtocolError(f"{where}: '{key}' must be an H x W x 3 uint8 image with sides in 1..{MAX_IMAGE_SIDE}")
        images[key] = image
    if "task" in obs and not isinstance(obs["task"], str):
        raise ProtocolError(f"{where}: task must be a string")
    return images
