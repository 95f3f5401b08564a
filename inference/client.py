"""A blocking client for the policy server, sending what the reference RoboTwin client sends.

Synchronous control:  reset -> infer (first images) -> [execute, feedback, infer] ...
Asynchronous control: reset -> infer -> infer -> [finish executing chunk c, start chunk c+1,
                      feedback for chunk c, infer chunk c+2] ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
from websockets.sync.client import connect

from .protocol import packb, unpackb


class ServerError(RuntimeError):
    """The server answered with a text frame (an error message) instead of a msgpack response."""


class PolicyClient:
    """One websocket connection to `lbva serve`; `metadata` is what the server sent on connect."""

    def __init__(self, uri: str, token: str | None = None, token_scheme: str = "Bearer") -> None:
        """token_scheme: "Bearer", or "Api-Key" as the reference client sends its key."""
        headers = {"Authorization": f"{token_scheme} {token}"} if token is not None else None
        # Entered as a context (what websockets >= 17 asks of connect()), closed by close().
        self._context = ExitStack()
        self._connection = self._context.enter_context(
            connect(uri, compression=None, max_size=None, additional_headers=headers, close_timeout=10))
        self.metadata = unpackb(self._connection.recv())

    def call(self, request: Mapping[str, Any]) -> dict:
        """Send one request, return its response; raises ServerError on an error frame."""
        self._connection.send(packb(dict(request)))
        reply = self._connection.recv()
        if isinstance(reply, str):
            raise ServerError(reply)
        return unpackb(reply)

    def reset(self, prompt: str) -> dict:
        return self.call({"reset": True, "prompt": prompt, "save_visualization": False})

    def infer(self, observation: Mapping[str, Any], prompt: str) -> np.ndarray:
        """-> the next chunk's actions [C, K, N]."""
        return self.call({"obs": dict(observation), "prompt": prompt, "save_visualization": False})["action"]

    def feedback(self, keyframes: Sequence[Mapping[str, Any]], executed: np.ndarray) -> dict:
        return self.call({"obs": [dict(frame) for frame in keyframes], "compute_kv_cache": True, "imagine": False,
                          "save_visualization": False, "state": executed})

    def imagine(self, observation: Mapping[str, Any], prompt: str, chunks: int) -> dict:
        """The server-side i2va mode: a new episode from one observation, `chunks` chunks without
        feedback -> {"latents": [z, chunks*K, h, w], "action": [chunks, C, K, N], "frames"?}."""
        return self.call({"imagine": True, "obs": dict(observation), "prompt": prompt, "chunks": chunks})

    def close(self) -> None:
        self._context.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
