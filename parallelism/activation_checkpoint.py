"""Activation checkpointing per depth: the depth's forward is recomputed in backward instead of
keeping its activations.

"full" checkpoints every depth; "selective" every k-th (depths 0, k, 2k, ...), trading memory for
recompute in between.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch.utils.checkpoint import checkpoint

from lbva.models.blocks import Depth


def _checkpointed(run: Callable) -> Callable:
    def run_checkpointed(*args):
        # Non-reentrant: composes with DTensors and with FSDP2's hooks around the call.
        return checkpoint(run, *args, use_reentrant=False)

    return run_checkpointed


def apply_activation_checkpointing(depths: list[Depth], mode: Literal["full", "selective"], every: int) -> None:
    """mode "full": every depth; "selective": depths 0, every, 2 * every, ..."""
    for depth in depths:
        if mode == "full" or depth.index % every == 0:
            depth.wrap(_checkpointed)
