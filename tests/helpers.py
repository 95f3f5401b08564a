"""Small builders shared by tests."""

from __future__ import annotations

import torch

from lbva.training.samples import ACTION_DIM, EpisodeSample


def random_sample(
    key: str, generator: torch.Generator, *, frames: int = 5, height: int = 8, width: int = 8,
    actions_per_frame: int = 4, channels: tuple[int, ...] = (0, 1), text_tokens: int = 6, text_dim: int = 32,
    latent_channels: int = 48,
) -> EpisodeSample:
    mask = torch.zeros(ACTION_DIM, dtype=torch.bool)
    mask[list(channels)] = True
    actions = torch.randn(ACTION_DIM, frames, actions_per_frame, generator=generator) * mask[:, None, None]
    actions[:, 0] = 0
    return EpisodeSample(
        key=key,
        source=key.split("/")[0],
        latents=torch.randn(latent_channels, frames, height, width, generator=generator),
        actions=actions,
        action_mask=mask,
        text_emb=torch.randn(text_tokens, text_dim, generator=generator),
    )
