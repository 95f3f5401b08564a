"""The flow-matching noise schedule of spec 3, in the reference code's sigma convention.

x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity noise - x0, and its
timestep input is sigma * 1000 (1000 = pure noise). Training draws one index per latent frame on a
shifted 1000-point grid and weights each frame's loss by a bell over the timestep (or, by choice,
uniformly: LOSS_WEIGHTINGS); inference walks
the same shifted grid with fewer points.
"""

from __future__ import annotations

import torch

GRID_SIZE = 1000
# "bell": the reference's per-frame weight (bell_weights), zero at pure noise; "uniform": every
# level weighs 1, so the highest noise levels, where only the history tells the clean frame, train too.
LOSS_WEIGHTINGS = ("bell", "uniform")


class FlowMatchGrid:
    """The shifted training grid (set_timesteps(1000, training=True), sigma_min 0, extra step).

    s = linspace(1, 0, 1001)[:-1]; sigma = shift * s / (1 + (shift - 1) * s). Video uses shift 5,
    actions shift 1 (LIBERO 0.05).
    """

    def __init__(self, shift: float, size: int = GRID_SIZE, weighting: str = "bell"):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting '{weighting}'; known: {', '.join(LOSS_WEIGHTINGS)}")
        s = torch.linspace(1.0, 0.0, size + 1, dtype=torch.float64)[:-1]
        self.size = size
        self.sigmas = (shift * s / (1 + (shift - 1) * s)).float()
        self.timesteps = self.sigmas * 1000.0
        self.weights = bell_weights(self.timesteps, size) if weighting == "bell" else torch.ones(size)

    def sample_indices(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """One grid index per frame: floor(size * u), u ~ U[0, 1)."""
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        return (u * self.size).long().clamp_(max=self.size - 1)

    def sample_history_indices(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Noisy-history levels: u ~ U[0.5, 1) on the same shifted grid (spec 3.3, code variant;
        with shift 5 this is sigma in (0.005, 0.833])."""
        u = 0.5 + 0.5 * torch.rand(count, generator=generator, dtype=torch.float64)
        return (u * self.size).long().clamp_(max=self.size - 1)


def bell_weights(timesteps: torch.Tensor, size: int = GRID_SIZE) -> torch.Tensor:
    """Loss weight per grid point: exp(-2 ((t - size/2) / size)^2), minus its minimum over the grid,
    scaled to mean 1 over the grid."""
    bell = torch.exp(-2.0 * ((timesteps.double() - size / 2) / size) ** 2)
    shifted = bell - bell.min()
    return (shifted * (size / shifted.sum())).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sigma broadcasts against x0 (per token: [..., L, 1])."""
    return (1.0 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0
