"""LeRobot dataset -> EpisodeSamples (latents, aligned and normalised actions, text) for training.

Per episode: frames are sampled every `stride` raw steps from frame 0 and cut to the longest 1 + 4k
prefix; each camera is encoded separately and the latents are tiled along width (spec 2.1). Actions
stay at the raw rate, N = 4 * stride per latent frame, aligned so that group f leads from latent
frame f-1 into latent frame f, mapped into the 30-d layout and quantile-normalised per slot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lbva.errors import UserError
from lbva.training.lerobot_v21 import LeRobotDataset
from lbva.training.samples import ACTION_DIM, EpisodeSample

log = logging.getLogger(__name__)

CLIP = 1.5  # normalised actions beyond the 1%/99% quantiles are clipped here (reference commit f66f602)


class VideoEncoder(Protocol):
    temporal_factor: int

    def encode(self, frames: np.ndarray) -> torch.Tensor: ...


class TextEncoder(Protocol):
    def encode(self, text: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class ActionStats:
    """Per-slot 1% and 99% quantiles of raw actions in the 30-d layout (unused slots 0)."""

    q01: np.ndarray  # [30] float64
    q99: np.ndarray  # [30] float64

    def normalize(self, actions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Raw [..., 30] -> (a - q01) / (q99 - q01 + 1e-6) * 2 - 1, clipped to +-1.5; slots off `mask` are 0."""
        scaled = (actions - self.q01) / (self.q99 - self.q01 + 1e-6) * 2.0 - 1.0
        return np.where(mask, np.clip(scaled, -CLIP, CLIP), 0.0)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form: {"q01": [30 floats], "q99": [30 floats]}."""
        return {"q01": [float(x) for x in self.q01], "q99": [float(x) for x in self.q99]}

    @classmethod
    def from_dict(cls, data: dict) -> ActionStats:
        """Inverse of to_dict; raises UserError when either list is missing or not 30 long."""
        try:
            q01 = np.asarray(data["q01"], np.float64)
            q99 = np.asarray(data["q99"], np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"action stats need numeric 'q01' and 'q99' lists ({err})") from err
        if q01.shape != (ACTION_DIM,) or q99.shape != (ACTION_DIM,):
            raise UserError(f"action stats need {ACTION_DIM} values in q01 and q99, got {q01.shape} and {q99.shape}")
        return cls(q01, q99)


def frame_stride(fps: int, target_fps: int) -> int:
    """Raw steps between sampled frames; fps must be a positive integer multiple of target_fps."""
    if target_fps <= 0 or fps <= 0 or fps % target_fps:
        raise UserError(f"dataset fps {fps} is not a positive integer multiple of target_fps {target_fps}; "
                        "pick a target_fps that divides it")
    return fps // target_fps


def align_actions(raw: np.ndarray, num_latent_frames: int, actions_per_frame: int) -> np.ndarray:
    """Raw actions [T, A] starting at the first sampled frame -> groups [F, N, A].

    Group 0 is a zero dummy (latent frame 0 is the first image alone); group f >= 1 holds raw rows
    (f-1)*N .. f*N-1, the actions issued between the last pixel frames of latents f-1 and f.
    """
    n, f = actions_per_frame, num_latent_frames
    needed = (f - 1) * n
    if len(raw) < needed:
        raise ValueError(f"{len(raw)} raw actions cannot fill {f} latent frames of {n} actions")
    padded = np.concatenate([np.zeros((n, raw.shape[1]), raw.dtype), raw[:needed]])
    return padded.reshape(f, n, raw.shape[1])


def _check_channels(action_channels: Sequence[int], action_dim: int, root: Path) -> np.ndarray:
    channels = np.asarray(action_channels, np.int64)
    if len(channels) != action_dim:
        raise UserError(f"{root}: action_channels has {len(channels)} entries but the dataset's actions have "
                        f"{action_dim} dims; give one 30-d slot per action dim")
    if len(set(channels.tolist())) != len(channels) or channels.min() < 0 or channels.max() >= ACTION_DIM:
        raise UserError(f"action_channels {list(action_channels)} must be distinct slots in 0..{ACTION_DIM - 1}")
    return channels


def build_samples(root: Path, *, target_fps: int, video_encoder: VideoEncoder, text_encoder: TextEncoder,
                  action_channels: Sequence[int], source: str | None = None
                  ) -> tuple[list[EpisodeSample], ActionStats]:
    """Read a LeRobot v2.x dataset at `root` and turn each episode into an EpisodeSample.

    `action_channels[i]` is the 30-d slot of dataset action dim i. Returns the samples (keys
    "<source>/episode_XXXXXX", source defaulting to the folder name) and the ActionStats computed
    over all raw actions of the dataset, which the samples are normalised with. Episodes too short
    for two latent frames are skipped with a warning; each video is decoded once.
    """
    dataset = LeRobotDataset(root)
    source = source or Path(root).resolve().name
    if not dataset.camera_keys:
        raise UserError(f"{root}: meta/info.json lists no video features; training needs at least one camera")
    stride = frame_stride(dataset.fps, target_fps)
    temporal = video_encoder.temporal_factor
    n = temporal * stride  # raw actions per latent frame

    text_cache: dict[str, torch.Tensor] = {}
    encoded: list[tuple[int, torch.Tensor, np.ndarray, torch.Tensor]] = []  # index, latents, groups, text
    all_actions: list[np.ndarray] = []
    channels: np.ndarray | None = None
    for index in dataset.episode_indices:
        length = dataset.episode_length(index)
        sampled = (length - 1) // stride + 1
        f = (sampled - 1) // temporal + 1
        episode = dataset.read_episode(index, frame_indices=range(0, (f - 1) * n + 1, stride))
        if channels is None:
            channels = _check_channels(action_channels, episode.actions.shape[1], root)
        all_actions.append(episode.actions)
        if f < 2:
            log.warning("%s: episode %d has %d frames, too few for two latent frames at stride %d; skipped",
                        root, index, length, stride)
            continue
        # Cameras are encoded separately and tiled along width in latent space (spec 2.1).
        latents = torch.cat([video_encoder.encode(episode.frames[key]) for key in dataset.camera_keys], dim=-1)
        if episode.task not in text_cache:
            text_cache[episode.task] = text_encoder.encode(episode.task)
        encoded.append((index, latents, align_actions(episode.actions, f, n), text_cache[episode.task]))
    if not encoded:
        raise UserError(f"{root}: no episode has enough frames for two latent frames at target_fps {target_fps}")

    mask = np.zeros(ACTION_DIM, bool)
    mask[channels] = True
    raw = np.concatenate(all_actions)
    q01 = np.zeros(ACTION_DIM)
    q99 = np.zeros(ACTION_DIM)
    q01[channels] = np.quantile(raw, 0.01, axis=0)
    q99[channels] = np.quantile(raw, 0.99, axis=0)
    stats = ActionStats(q01, q99)

    samples = []
    for index, latents, groups, text_emb in encoded:
        full = np.zeros((*groups.shape[:2], ACTION_DIM))  # [F, N, 30]
        full[..., channels] = groups
        normalized = stats.normalize(full, mask)
        normalized[0] = 0.0  # the dummy group of latent frame 0 is zero after normalisation too
        samples.append(EpisodeSample(
            key=f"{source}/episode_{index:06d}",
            source=source,
            latents=latents,
            actions=torch.from_numpy(normalized.astype(np.float32)).permute(2, 0, 1).contiguous(),  # [30, F, N]
            action_mask=torch.from_numpy(mask),
            text_emb=text_emb,
        ))
    return samples, stats
