"""Small building blocks shared by both streams. Module names follow diffusers' Wan transformer so
released weights load by name."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[...] timesteps -> [..., dim] features, cosines first (flip_sin_to_cos), no frequency shift."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float().unsqueeze(-1) * torch.exp(exponent)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    """umT5 features (text_dim) -> stream width: Linear, tanh-GELU, Linear."""

    def __init__(self, text_dim: int, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(text), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    """Per-token timestep conditioning (and, for the video stream, the text projection).

    forward: timesteps [B, L] (sigma * 1000) -> temb [B, L, W] and timestep_proj [B, L, 6, W],
    both float32: the modulation is computed in float32 as in the reference.
    """

    def __init__(self, width: int, freq_dim: int, text_dim: int | None):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, width)
        self.time_proj = nn.Linear(width, 6 * width)
        self.text_embedder = TextProjection(text_dim, width) if text_dim is not None else None

    def forward(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = sinusoidal_timestep_embedding(timesteps, self.freq_dim)
        features = features.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(features).float()
        timestep_proj = self.time_proj(F.silu(temb).to(self.time_proj.weight.dtype)).float()
        return temb, timestep_proj.unflatten(-1, (6, -1))


class GELUProjection(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear, named net.0.proj / net.2 like diffusers' FeedForward."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(width, hidden), nn.Dropout(0.0), nn.Linear(hidden, width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class ActionMLP(nn.Module):
    """The paper's action encoder / decoder: one hidden layer (256 wide at full size)."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))
