"""One episode -> its prepared samples (format.py members): frame sampling, VAE latents, tiled cameras,
actions in the 30-d layout, normalised.

A sample covers raw frames [start, end) of its episode. Frames are taken every `stride` raw steps from
`start` and cut to the longest 1 + 4k prefix, so F = 1 + k latent frames; each camera is resized and
encoded on its own and the latents are tiled (tiling.py). Actions stay at the raw rate, N = 4 * stride
per latent frame, group f leading from latent frame f-1 into f and group 0 zero (spec 2.1); they are
mapped into the 30-d layout and normalised with the source's q01/q99.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM, ActionStats
from lbva.models.encoders import EncoderChoice
from lbva.models.tiling import Tiling, resize_frames
from lbva.training.data.alignment import align_actions
from lbva.training.data.format import EMPTY_TEXT_ID, SampleMeta, encode_members, sample_key, text_id
from lbva.training.data.lerobot import LeRobotDataset

DIT_PATCH = 2  # the DiT patchifies latents 2x2 (spec 2.1): one video token per 2x2 latent cells


@dataclass(frozen=True)
class SamplePlan:
    """One sample to prepare: raw frames [start, end) of an episode, with its text."""

    episode: int
    segment: int  # index in the episode's action_config; 0 for a whole episode
    start: int
    end: int
    text: str
    latent_frames: int

    def frame_ids(self, stride: int, temporal: int) -> list[int]:
        """The raw frames encoded: every `stride`-th from `start`, 1 + temporal * (F - 1) of them."""
        return [self.start + stride * j for j in range(1 + temporal * (self.latent_frames - 1))]


def stored_text_id(text: str) -> str:
    """The id a text's embedding is stored under: format.text_id, or EMPTY_TEXT_ID for the empty text."""
    return EMPTY_TEXT_ID if text == "" else text_id(text)


def latent_frames(num_frames: int, stride: int, temporal: int) -> int:
    """Latent frames of a clip of `num_frames` raw frames sampled every `stride`: the 1 + 4k rule."""
    sampled = (num_frames - 1) // stride + 1
    return (sampled - 1) // temporal + 1


@dataclass(frozen=True)
class EpisodeSettings:
    """Everything a worker needs to encode episodes; picklable, so it travels to spawned processes."""

    src: Path
    source: str
    target_fps: int
    stride: int
    cameras: tuple[str, ...]
    tiling: Tiling
    channels: tuple[int, ...]  # 30-d slot of each dataset action dim; () for a video-only source
    stats: ActionStats
    encoders: EncoderChoice
    device: str
    temporal_factor: int
    canvas: tuple[int, int]  # (h, w) of the tiled latent canvas

    @property
    def actions_per_frame(self) -> int:
        return self.temporal_factor * self.stride

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.canvas
        return (h // DIT_PATCH) * (w // DIT_PATCH) + self.actions_per_frame


@dataclass
class EpisodeResult:
    episode: int
    samples: list[tuple[dict, SampleMeta]]  # (members for ShardWriter.write, meta), in plan order
    error: str | None = None  # why the episode was left out, naming the file


class EpisodeEncoder:
    """Holds the dataset reader and the video encoder of one process; `encode` does one episode."""

    def __init__(self, settings: EpisodeSettings) -> None:
        self.settings = settings
        self.dataset = LeRobotDataset(settings.src)
        self.video = settings.encoders.video(settings.device)
        self.mask = np.zeros(ACTION_DIM, bool)
        self.mask[list(settings.channels)] = True

    def encode(self, episode: int, samples: list[SamplePlan]) -> EpisodeResult:
        """Decode the episode's frames once and encode each planned sample. Bad data on disk
        (the reader's UserErrors) comes back as `error` instead of raising."""
        s = self.settings
        wanted = sorted({f for sample in samples for f in sample.frame_ids(s.stride, s.temporal_factor)})
        try:
            raw = self.dataset.read_episode(episode, frame_indices=wanted)
            if raw.actions.shape[1] != len(s.channels):
                raise UserError(f"{self.dataset.data_file(episode)}: actions have {raw.actions.shape[1]} dims, "
                                f"the action channel map has {len(s.channels)}")
        except UserError as err:
            return EpisodeResult(episode, [], str(err))
        row = {frame: i for i, frame in enumerate(wanted)}
        out = []
        for sample in samples:
            rows = [row[f] for f in sample.frame_ids(s.stride, s.temporal_factor)]
            latents = self._latents([raw.frames[key][rows] for key in s.cameras])
            expected = (self.video.z_dim, sample.latent_frames, *s.canvas)
            if tuple(latents.shape) != expected:
                raise RuntimeError(f"video encoder gave latents {tuple(latents.shape)}, expected {expected}")
            actions = self._actions(raw.actions[sample.start:sample.end], sample.latent_frames)
            meta = SampleMeta(
                key=sample_key(s.source, episode, sample.segment), source=s.source, episode=episode,
                segment=sample.segment, start_frame=sample.start, end_frame=sample.end, fps=raw.fps,
                target_fps=s.target_fps, text=sample.text,
                text_id=stored_text_id(sample.text),
                latent_frames=sample.latent_frames, tokens_per_frame=s.tokens_per_frame)
            out.append((encode_members(latents.numpy(), actions, self.mask, meta), meta))
        return EpisodeResult(episode, out)

    def _latents(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Per-camera uint8 frames [T, H_i, W_i, 3] -> tiled latents [C, F, h, w]; cameras of one size
        are encoded as one batch."""
        tiling = self.settings.tiling
        per_camera: list[torch.Tensor | None] = [None] * len(frames)
        for group in tiling.groups():
            size = tiling.camera_sizes[group[0]]
            batch = torch.stack([resize_frames(frames[i], size) for i in group])  # [B, 3, T, H, W]
            for i, latents in zip(group, self.video.encode(batch)):
                per_camera[i] = latents
        return tiling.tile(per_camera)

    def _actions(self, raw: np.ndarray, num_latent_frames: int) -> np.ndarray:
        """Raw actions of the sample [T, A] -> normalised [30, F, N] float32 (zeros for video-only)."""
        n = self.settings.actions_per_frame
        full = np.zeros((num_latent_frames, n, ACTION_DIM))
        if self.settings.channels:
            full[..., list(self.settings.channels)] = align_actions(raw, num_latent_frames, n)
            full = self.settings.stats.normalize(full, self.mask)
            full[0] = 0.0  # the dummy group of latent frame 0 is zero after normalisation too
        return full.transpose(2, 0, 1).astype(np.float32)
