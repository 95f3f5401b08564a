"""Everything a resumed run needs, as one DCP `Stateful`: model, optimizer, scheduler, step,
data-stream position, RNG, and the weights' moving average when the run keeps one. Model and
optimizer go through `get_state_dict` / `set_state_dict`, so FSDP2 / DTensor shards are saved as
shards and resharded on load onto whatever mesh is current."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful


class StreamState(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainState(Stateful):
    """The training state at a step boundary. `step` counts completed optimizer steps.

    RNG: the trainer derives every random draw of a step from (seed, step, sequence), so the saved
    RNG state (rank 0's, applied on every rank) matters only to code outside that discipline.

    `ema` (training/ema.py, or None): its state_dict holds tensors shaped and placed like the
    parameters, so DCP saves it as shards and reshards it on load like the model; key "ema".
    `tokens_seen`: real tokens trained on by all ranks together, over every start of the run.

    OPTIONAL parts may be missing from a checkpoint (saved without EMA, or by an older release);
    `without(parts)` leaves them out of what a load asks DCP for, so they keep their fresh values:
    an EMA turned on at resume then starts from the resumed weights.
    """

    OPTIONAL = ("ema", "tokens_seen")

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, stream: StreamState, step: int = 0,
                 ema: Stateful | None = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.stream = stream
        self.step = step
        self.ema = ema
        self.tokens_seen = 0
        self._left_out: frozenset[str] = frozenset()

    @contextlib.contextmanager
    def without(self, parts: set[str]) -> Iterator[None]:
        """Leave the OPTIONAL `parts` out of state_dict() inside the block (a load that lacks them)."""
        unknown = set(parts) - set(self.OPTIONAL)
        if unknown:
            raise ValueError(f"TrainState parts {sorted(unknown)} are not optional")
        self._left_out = frozenset(parts)
        try:
            yield
        finally:
            self._left_out = frozenset()

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "stream": self.stream.state_dict(),
            "rng": _rng_state(),
            "tokens_seen": self.tokens_seen,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return {key: value for key, value in state.items() if key not in self._left_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.stream.load_state_dict(state["stream"])
        _set_rng_state(state["rng"])
        self.tokens_seen = int(state.get("tokens_seen", self.tokens_seen))
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:
            # Loading the optimizer ran a zero-gradient step to create its state, which the EMA
            # saw as an update: start it afresh, so the next step copies the resumed weights.
            self.ema.restart()
