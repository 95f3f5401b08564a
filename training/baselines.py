"""Reference predictors that a trained world model has to beat, scored by the training objective.

The per-dimension Gaussian-prior denoiser knows only each dimension's mean and variance over the
training data (no history, no actions, no text). Under the flow-matching path
x_sigma = (1 - sigma) x0 + sigma eps with x0 ~ N(m, s^2) and eps ~ N(0, 1), the best prediction of
the velocity eps - x0 from x_sigma alone is the conditional mean

    E[eps - x0 | x_sigma] = (sigma - (1 - sigma) s^2) / ((1 - sigma)^2 s^2 + sigma^2) * (x_sigma - (1 - sigma) m) - m

A model whose video loss does not go below this one's on the same draws has learned nothing
about the world beyond the marginal statistics of its latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lbva.models.attention import build_kernels
from lbva.models.mot import LingBotVA
from lbva.models.patching import input_to_output_order

from .data.packing import PackedSequence
from .step import FlowMatchingObjective, StepBatch, StepDraws


def gaussian_prior_velocity(
    noised: torch.Tensor, sigma: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor
) -> torch.Tensor:
    """noised [..., D] at noise level sigma [..., 1] (0 = clean, 1 = noise); mean, variance [D]
    per dimension of the clean data -> the Gaussian-prior velocity prediction [..., D]."""
    kept = 1.0 - sigma
    gain = (sigma - kept * variance) / (kept * kept * variance + sigma * sigma).clamp_min(1e-12)
    return gain * (noised - kept * mean) - mean


def channel_statistics(latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance over latents [C, F, h, w] of any frame counts and sizes."""
    flat = torch.cat([x.float().flatten(1) for x in latents], dim=1).double()
    return flat.mean(1).float(), flat.var(1).float()


@dataclass
class ScoredSequence:
    """One sequence's model output beside its Gaussian-prior prediction, on the same draws."""

    batch: StepBatch
    video_pred: torch.Tensor  # [Lv, D] the model's, head order
    action_pred: torch.Tensor  # [La, 30]
    prior_video_pred: torch.Tensor  # [Lv, D] the Gaussian prior's, head order

    def video_losses(self, objective: FlowMatchingObjective) -> tuple[float, float]:
        """(model, prior) video flow-matching losses of the objective."""
        return tuple(objective.losses(self.batch.targets, p, self.action_pred).video.item()
                     for p in (self.video_pred, self.prior_video_pred))


@torch.no_grad()
def score_against_prior(objective: FlowMatchingObjective, model: LingBotVA, sequences: list[tuple[PackedSequence, StepDraws]],
                        mean_c: torch.Tensor, var_c: torch.Tensor) -> list[ScoredSequence]:
    """The model (one process, eval mode) and the per-channel Gaussian prior (channel mean and
    variance of the training latents) on each (sequence, draws)."""
    model.eval()
    patch = model.config.patch_size
    volume = patch[0] * patch[1] * patch[2]
    mean, variance = mean_c.repeat_interleave(volume), var_c.repeat_interleave(volume)  # channel-major tokens
    scored = []
    for seq, draws in sequences:
        batch = objective.prepare(seq, draws, patch, torch.device("cpu"))
        kernels = build_kernels(batch.layout, batch.layout.sample_id, batch.text_sample, "sdpa")
        video_pred, action_pred = model(batch.inputs, kernels)
        sigma = batch.inputs.video_timesteps[0][:, None] / 1000.0
        prior = input_to_output_order(gaussian_prior_velocity(batch.inputs.video_tokens[0], sigma, mean, variance),
                                      patch)
        scored.append(ScoredSequence(batch, video_pred[0], action_pred[0], prior))
    return scored
