"""Per-frame flow-matching losses of spec 3: each latent frame's squared error is averaged over its
valid elements and weighted by the bell weight of its timestep (the schedule and the weights live in
models/flow_schedule.py, shared with inference).
"""

from __future__ import annotations

import torch


def per_frame_sums(
    prediction: torch.Tensor, target: torch.Tensor, element_mask: torch.Tensor, frame_slot: torch.Tensor, frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-error sum and valid-element count per frame slot, [frames] each: the additive part of
    the loss, which ranks holding parts of a frame's tokens can sum before weighted_frame_mean."""
    mask = element_mask.to(prediction.dtype)
    squared = (prediction.float() - target.float()) ** 2 * mask
    sums = torch.zeros(frames, device=prediction.device).index_add(0, frame_slot, squared.sum(dim=-1))
    counts = torch.zeros(frames, device=prediction.device).index_add(0, frame_slot, mask.sum(dim=-1).float())
    return sums, counts


def weighted_frame_mean(sums: torch.Tensor, counts: torch.Tensor, frame_weight: torch.Tensor) -> torch.Tensor:
    """sum / count * weight per frame, averaged over the frames that have any valid element; zero
    (still attached to the graph) when none has."""
    valid = counts > 0
    if not bool(valid.any()):
        return sums.sum() * 0.0
    return (sums[valid] / counts[valid] * frame_weight[valid]).mean()


def per_frame_weighted_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    element_mask: torch.Tensor,
    frame_slot: torch.Tensor,
    frame_weight: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error per frame (over the frame's valid elements), times the frame's weight,
    averaged over the frames that have any valid element.

    prediction, target, element_mask: [N, D] for the N supervised tokens; frame_slot [N] indexes
    frame_weight [G]. Frames with no valid element (e.g. a video-only source's actions) drop out.
    Returns a scalar; zero (still attached to the graph) when nothing is valid.
    """
    sums, counts = per_frame_sums(prediction, target, element_mask, frame_slot, frame_weight.shape[0])
    return weighted_frame_mean(sums, counts, frame_weight)
