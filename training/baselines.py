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

import torch


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
