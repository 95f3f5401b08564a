"""3D rotary position embedding over explicit (frame, row, column) grid ids.

Positions are given per token rather than derived from a grid, so action tokens can sit at
fractional frame positions between video frames (spec 2.2). The head dim splits into frame / row /
column parts as in Wan (44/42/42 for head_dim 128), each with its own frequency ladder, and the
rotation pairs adjacent channels (x[2i], x[2i+1]).
"""

from __future__ import annotations

import torch
from torch import nn


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


class RotaryEmbedding3D(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        ladders = [
            1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim) for dim in rope_axis_dims(head_dim)
        ]
        self.axis_sizes = [len(ladder) for ladder in ladders]
        self.register_buffer("inv_freq", torch.cat(ladders), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L, 3] (frame, row, col) -> cos, sin [B, L, 1, head_dim // 2] float32."""
        inv_freq = self.inv_freq.to(positions.device)
        axis_of_freq = torch.repeat_interleave(
            torch.arange(3, device=positions.device), torch.tensor(self.axis_sizes, device=positions.device)
        )
        # float64 angles: absolute frame counters grow during inference and fractions matter.
        angles = positions.double()[..., axis_of_freq] * inv_freq
        return torch.cos(angles).float().unsqueeze(2), torch.sin(angles).float().unsqueeze(2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] by the angles of cos/sin [B, L, 1, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
