"""How one step's objective runs on this rank's part of a parallel layout.

The objective's step (training/step.py `run_objective`) prepares a packed sequence's batch, builds
its attention kernels, runs the model on this rank's tokens and takes the losses. What a layout
changes in that sequence is a StepLayout: which kernels attend (Ulysses wraps them under context
parallelism), which tokens of each part of the sequence this rank holds, and how the per-frame loss
sums of those tokens complete over the ranks that hold the rest. The pipeline runs the same hooks
inside its stages and its schedule's loss.

What parallelism knows of a batch's loss targets is the TokenTargets protocol; the loss itself comes
in as a LossFn, so nothing here imports the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import torch

from lbva.models.attention import AttentionKernels, Backend, build_kernels
from lbva.models.masks import TokenLayout
from lbva.models.mot import ModelInputs

# (full-sequence layout [B, L], text sample ids [B, T], video tokens in the full sequence) -> kernels
KernelBuilder = Callable[[TokenLayout, torch.Tensor, int], AttentionKernels]
# (per-frame sums [G], per-frame counts [G]) -> the same over every rank holding part of the frames
FrameReduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

Targets = TypeVar("Targets", bound="TokenTargets")


class TokenTargets(Protocol):
    """Per-token loss inputs of one sequence, video rows then action rows (training/step.py
    LossTargets)."""

    @property
    def num_video(self) -> int: ...

    @property
    def num_action(self) -> int: ...

    def rows(self: Targets, video: slice, action: slice) -> Targets:
        """The targets of the video rows `video` and the action rows `action`."""
        ...

    def padded(self: Targets, num_video: int, num_action: int) -> Targets:
        """The targets extended with loss-free padding rows to num_video and num_action rows."""
        ...


class TargetedBatch(Protocol):
    """One packed sequence ready for the model (training/step.py StepBatch)."""

    inputs: ModelInputs  # batch of one
    layout: TokenLayout  # [1, Lv + La], video first
    text_sample: torch.Tensor  # [1, T] sample id of each text token
    targets: TokenTargets


# (targets, video prediction [Lv, D], action prediction [La, action_dim], frame reduce) -> loss
# terms, whose `.total` is what backward runs from
LossFn = Callable[[Any, torch.Tensor, torch.Tensor, FrameReduce], Any]


def no_reduce(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FrameReduce of a rank that holds every token of its sequence."""
    return sums, counts


@dataclass(frozen=True)
class StepLayout:
    """The hooks of one rank's layout: kernels, the token shard it holds, the frame-sum reduction.

    token_shard(n): this rank's contiguous part of a sequence part (video or action) of n tokens;
    None when the rank holds every token.
    """

    kernels: KernelBuilder
    reduce_frames: FrameReduce = no_reduce
    token_shard: Callable[[int], slice] | None = None

    def shard_inputs(self, inputs: ModelInputs) -> ModelInputs:
        """This rank's tokens of both parts; the text stays whole."""
        if self.token_shard is None:
            return inputs
        video, action = self.token_shard(inputs.video_tokens.shape[1]), self.token_shard(inputs.action_tokens.shape[1])
        return replace(
            inputs,
            video_tokens=inputs.video_tokens[:, video],
            video_timesteps=inputs.video_timesteps[:, video],
            video_positions=inputs.video_positions[:, video],
            action_tokens=inputs.action_tokens[:, action],
            action_timesteps=inputs.action_timesteps[:, action],
            action_positions=inputs.action_positions[:, action],
        )

    def shard_targets(self, targets: Targets) -> Targets:
        """The loss targets of this rank's tokens."""
        if self.token_shard is None:
            return targets
        return targets.rows(self.token_shard(targets.num_video), self.token_shard(targets.num_action))


def plain_layout(backend: Backend) -> StepLayout:
    """One rank holding the whole sequence: the step's kernels straight from its layout."""

    def kernels(layout: TokenLayout, text_sample: torch.Tensor, num_video: int) -> AttentionKernels:
        return build_kernels(layout, layout.sample_id, text_sample, backend)

    return StepLayout(kernels)
