"""Sampling schedules, the Euler step and classifier-free guidance (spec 3.1, 4.1).

Sigma convention of models/flow_schedule.py: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts
eps - x0 at timestep sigma * 1000, and an Euler step is x <- x + v (sigma_next - sigma).
"""

from __future__ import annotations

import torch

from lbva.models.flow_schedule import FlowMatchGrid


def denoising_sigmas(steps: int, shift: float, stop_sigma: float = 0.0) -> torch.Tensor:
    """The noise levels a loop visits, from 1 down to where it stops: [J + 1] float32.

    The full schedule is the reference's inference grid: `steps` shifted levels from 1, then 0
    (FlowMatchGrid with `steps` points, plus the final 0). Partial denoising stops at the first level
    at or below `stop_sigma` and lands exactly on it, so the loop runs J Euler steps and the last
    entry is the noise level the latent is cached at. stop_sigma 0 gives the full schedule.
    """
    if steps < 1:
        raise ValueError(f"a denoising loop needs >= 1 step, got {steps}")
    if not 0.0 <= stop_sigma < 1.0:
        raise ValueError(f"the partial-denoising stop level must lie in [0, 1), got {stop_sigma}")
    full = torch.cat([FlowMatchGrid(shift, size=steps).sigmas, torch.zeros(1)])
    stop = int(torch.nonzero(full <= stop_sigma)[0])
    sigmas = full[: stop + 1].clone()
    sigmas[-1] = stop_sigma
    return sigmas


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + velocity * (sigma_next - sigma)


def guided(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, L, D] -> [L, D]: row 0 alone when scale is 1 (or there is no negative row), else
    uncond + scale * (cond - uncond) with row 0 the prompt and row 1 the negative prompt."""
    if scale == 1.0 or prediction.shape[0] == 1:
        return prediction[0]
    cond, uncond = prediction[0].float(), prediction[1].float()
    return (uncond + scale * (cond - uncond)).to(prediction.dtype)
