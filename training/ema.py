"""Exponential moving average of the trained weights (`optim.ema_decay`), kept beside them.

Each EMA tensor is a clone of its parameter: under FSDP2 / TP a DTensor of the same placement,
so the average is sharded like the weights, updated on local shards without communication, and
saved and resharded by DCP with the rest of TrainState (key "ema"). The first update copies the
weights, later ones lerp towards them:

    ema_1 = w_1,    ema_t = decay * ema_{t-1} + (1 - decay) * w_t

so the average starts from whatever the run starts from (random init, imported weights).
`lbva export ... --ema` writes these tensors instead of the raw weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class WeightEMA:
    """The EMA of `model`'s trainable parameters, by parameter name (a DCP Stateful)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        self.weights = {name: p.detach().clone() for name, p in named}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        averages = [_local(t) for t in self.weights.values()]
        params = [_local(p.detach()) for p in self._params]
        if self.updates == 0:
            torch._foreach_copy_(averages, params)
        else:
            torch._foreach_lerp_(averages, params, 1.0 - self.decay)
        self.updates += 1

    def restart(self) -> None:
        """The next update copies the weights, as the first one of a run does."""
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, tensor in self.weights.items():
                if state["weights"][name] is not tensor:  # DCP loads in place; a plain dict may not
                    tensor.copy_(state["weights"][name])
        self.updates = int(state["updates"])


def build_ema(model: torch.nn.Module, optimizer: torch.optim.Optimizer, decay: float) -> WeightEMA | None:
    """The EMA of `model`, updated after every step of `optimizer`; None when decay is 0 (off)."""
    if decay == 0.0:
        return None
    ema = WeightEMA(model, decay)
    optimizer.register_step_post_hook(lambda *_: ema.update())
    return ema
