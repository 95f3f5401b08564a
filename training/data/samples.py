"""The unit of training data: one episode (or segment) at latent level, before windowing and packing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lbva.models.action_space import ACTION_DIM


@dataclass
class EpisodeSample:
    """One episode's latents, actions and text, ready to be cut into windows and packed.

    Action group f (actions[:, f]) holds the N raw actions that lead from latent frame f-1 into
    latent frame f; group 0 is a zero dummy (spec 2.1) and is never supervised.
    """

    key: str  # unique and stable, e.g. "demo/episode_000012"
    source: str  # dataset/source name, used for mixing and per-source statistics
    latents: torch.Tensor  # [C, F, h, w] float32, normalised VAE (or stand-in) latents
    actions: torch.Tensor  # [30, F, N] float32, quantile-normalised and clipped to [-1.5, 1.5]
    action_mask: torch.Tensor  # [30] bool: channels this source fills
    text_emb: torch.Tensor  # [T, text_dim] float32, text-encoder output, zero past the true length

    def __post_init__(self) -> None:
        c, f, h, w = self.latents.shape
        a, fa, _ = self.actions.shape
        if a != ACTION_DIM or fa != f:
            raise ValueError(
                f"sample {self.key}: actions {tuple(self.actions.shape)} do not match "
                f"[{ACTION_DIM}, {f}, N] for latents {tuple(self.latents.shape)}"
            )
        if self.action_mask.shape != (ACTION_DIM,):
            raise ValueError(f"sample {self.key}: action_mask must have shape [{ACTION_DIM}]")

    @property
    def num_frames(self) -> int:
        return self.latents.shape[1]

    @property
    def actions_per_frame(self) -> int:
        return self.actions.shape[2]
