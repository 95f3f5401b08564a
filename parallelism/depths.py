"""The model's depths as the parallel wrappers see them: which blocks a depth owns and which method
runs it in one call (models/blocks.py), with the role of each of that method's arguments.

Every wrapper (TP's sequence-parallel boundary, activation checkpointing, compile, FSDP's unshard)
replaces the depth's entry method on its instance, so parameter names never change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lbva.models.mot import LingBotVA


@dataclass(frozen=True)
class Depth:
    """One depth: `blocks` hold its parameters, `entry.<method>(*args)` runs it.

    Argument roles (indices into args): `streams` are the residual streams [B, L, W] (returned, in
    order, by the call), `conditioning` per-token tensors every depth reads (timestep
    projections [B, L, 6, W]), `rope` the (cos, sin) pairs, `text` the projected text, `kernels`
    the AttentionKernels.
    """

    index: int
    blocks: tuple[nn.Module, ...]
    entry: nn.Module
    method: str
    streams: tuple[int, ...]
    conditioning: tuple[int, ...]
    rope: tuple[int, ...]
    text: int
    kernels: int

    def wrap(self, wrapper: Callable[[Callable], Callable]) -> None:
        """Replace the entry method by wrapper(current entry method)."""
        setattr(self.entry, self.method, wrapper(getattr(self.entry, self.method)))


def model_depths(model: LingBotVA) -> list[Depth]:
    """The depths of either layout, in execution order."""
    if model.action_blocks is None:
        # block.forward(x, timestep_proj, rope, text, kernels)
        return [
            Depth(i, (block,), block, "forward", streams=(0,), conditioning=(1,), rope=(2,), text=3, kernels=4)
            for i, block in enumerate(model.blocks)
        ]
    # video_block.joint_forward(action_block, x_video, x_action, proj_video, proj_action,
    #                           rope_video, rope_action, text, kernels)
    return [
        Depth(
            i, (video, action), video, "joint_forward", streams=(1, 2), conditioning=(3, 4), rope=(5, 6), text=7,
            kernels=8,
        )
        for i, (video, action) in enumerate(zip(model.blocks, model.action_blocks))
    ]
