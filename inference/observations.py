"""What a robot sends -> model inputs, and predicted actions -> what it executes.

Cameras (spec 2.1): each camera image is resized on its own and encoded on its own, and the latents
are tiled into one canvas (models/tiling.py). Frames arrive one chunk at a time, so encoding is
streaming: the first frame of an episode alone, then groups of 4 frames per latent frame, continuing
the causal encoder where the previous chunk left it.

Actions (spec 4.1, 6.2): the robot's action dims map onto slots of the 30-d layout; the model works
on quantile-normalised values, a_n = (a - q01) / (q99 - q01 + 1e-6) * 2 - 1.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lbva.models.action_space import ACTION_DIM, ActionStats
from lbva.models.encoders import EncoderChoice, StandInVideo, WanVideoEncoder
from lbva.models.tiling import Tiling, resize_frames


@dataclass(frozen=True)
class ActionCodec:
    """Robot action dims <-> normalised 30-d action tokens."""

    channels: tuple[int, ...]  # 30-d slot of each robot action dim
    stats: ActionStats

    @property
    def mask(self) -> torch.Tensor:
        """[30] bool: the slots the robot uses; the others stay zero in every model input."""
        mask = torch.zeros(ACTION_DIM, dtype=torch.bool)
        mask[list(self.channels)] = True
        return mask

    def normalize(self, executed: np.ndarray) -> torch.Tensor:
        """Executed actions [C, K, N] in robot units -> tokens [K*N, 30] float32 in (frame, step) order."""
        c, k, n = executed.shape
        full = np.zeros((k, n, ACTION_DIM))
        full[..., list(self.channels)] = np.transpose(executed, (1, 2, 0))
        normalized = self.stats.normalize(full, self.mask.numpy())
        return torch.from_numpy(normalized.reshape(k * n, ACTION_DIM).astype(np.float32))

    def denormalize(self, tokens: torch.Tensor, frames: int, steps: int) -> np.ndarray:
        """Tokens [K*N, 30] -> robot actions [C, K, N] float32."""
        normalized = tokens.detach().float().cpu().numpy().reshape(frames, steps, ACTION_DIM)
        raw = (normalized + 1.0) / 2.0 * (self.stats.q99 - self.stats.q01 + 1e-6) + self.stats.q01
        return np.ascontiguousarray(np.transpose(raw[..., list(self.channels)], (2, 0, 1)).astype(np.float32))


class StreamingEncoder(Protocol):
    """Causal video encoding of one camera group across calls: pixels [B, 3, T, H, W] in [-1, 1]."""

    def first(self, pixels: torch.Tensor) -> torch.Tensor: ...  # T = 1 -> [B, z, 1, h, w]

    def extend(self, pixels: torch.Tensor) -> torch.Tensor: ...  # T = 4n -> [B, z, n, h, w]


class ContextFrameStream:
    """Streams an encoder that sees each group of 4 frames on its own (the stand-in): a continuation
    is encoded as [last frame seen] + new frames, and the latent of that context frame dropped."""

    def __init__(self, encoder: StandInVideo) -> None:
        self.encoder = encoder
        self.last: torch.Tensor | None = None

    def first(self, pixels: torch.Tensor) -> torch.Tensor:
        self.last = pixels[:, :, -1:]
        return self.encoder.encode(pixels)

    def extend(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.encoder.encode(torch.cat([self.last, pixels], dim=2))[:, :, 1:]
        self.last = pixels[:, :, -1:]
        return latents


class WanCausalStream:
    """Streams the Wan2.2 VAE: its causal encoder keeps a per-conv feature cache between chunks of
    frames, as one whole-clip encode does internally, so chunk-by-chunk latents equal whole-clip ones.
    This drives diffusers' AutoencoderKLWan below its public API (encoder, quant_conv, the encoder
    conv count); it is written against diffusers 0.42."""

    def __init__(self, wan: WanVideoEncoder) -> None:
        self.wan = wan
        self.feature_cache: list | None = None

    def first(self, pixels: torch.Tensor) -> torch.Tensor:
        self.feature_cache = [None] * self.wan.vae._cached_conv_counts["encoder"]
        return self._encode(pixels)

    def extend(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.wan.temporal_factor
        return torch.cat([self._encode(pixels[:, :, i:i + t]) for i in range(0, pixels.shape[2], t)], dim=2)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        vae = self.wan.vae
        x = pixels.to(self.wan.device, next(vae.parameters()).dtype)
        if vae.config.patch_size is not None:
            x = patchify(x, patch_size=vae.config.patch_size)
        moments = vae.quant_conv(vae.encoder(x, feat_cache=self.feature_cache, feat_idx=[0]))
        mean = moments[:, : self.wan.z_dim].float()
        return ((mean - self.wan.mean) / self.wan.std).cpu()


@dataclass(frozen=True)
class CameraLayout:
    """Which observation keys are cameras, in tiling order, and how they are tiled."""

    keys: tuple[str, ...]
    tiling: Tiling


class ObservationEncoder:
    """Camera images of one episode -> latent frames [z, F, h, w] of the tiled canvas."""

    def __init__(self, layout: CameraLayout, encoders: EncoderChoice, device: str) -> None:
        self.layout = layout
        self._video = encoders.video(device)
        self.temporal_factor: int = self._video.temporal_factor  # observed frames per latent frame
        self._streams: list[StreamingEncoder] = []
        # Sessions run their requests in threads of their own; the VAE's whole-clip decode keeps its
        # causal cache on the module, so siblings take turns on it (streams carry their own cache).
        self._decoding = threading.Lock()

    def sibling(self) -> ObservationEncoder:
        """An encoder for another episode: the same loaded video encoder, streams of its own."""
        other = copy.copy(self)
        other._streams = []
        return other

    def decode(self, latents: torch.Tensor) -> np.ndarray | None:
        """Latents of the tiled canvas [z, F, h, w] -> uint8 frames [F, H, W, 3] of the canvas (the
        cameras side by side as tiled), or None where the video encoder cannot decode (the stand-in)."""
        if not isinstance(self._video, WanVideoEncoder):
            return None
        with self._decoding:
            return self._video.decode_frames(latents).numpy()

    def _stream(self) -> StreamingEncoder:
        if isinstance(self._video, WanVideoEncoder):
            return WanCausalStream(self._video)
        return ContextFrameStream(self._video)

    def start(self, observation: Mapping[str, np.ndarray]) -> torch.Tensor:
        """The episode's first observation (one image per camera) -> [z, 1, h, w]; restarts the streams."""
        groups = self.layout.tiling.groups()
        self._streams = [self._stream() for _ in groups]
        return self._encode([[observation[key]] for key in self.layout.keys], lambda s, x: s.first(x))

    def extend(self, keyframes: Sequence[Mapping[str, np.ndarray]]) -> torch.Tensor:
        """4n further observations, oldest first -> [z, n, h, w]."""
        per_camera = [[frame[key] for frame in keyframes] for key in self.layout.keys]
        return self._encode(per_camera, lambda s, x: s.extend(x))

    def _encode(self, per_camera: list[list[np.ndarray]], call) -> torch.Tensor:
        tiling = self.layout.tiling
        latents: list[torch.Tensor | None] = [None] * len(per_camera)
        # Cameras of one size are encoded as one batch, each size group with its own causal state.
        for stream, group in zip(self._streams, tiling.groups()):
            size = tiling.camera_sizes[group[0]]
            pixels = torch.stack([resize_frames(np.stack(per_camera[i]), size) for i in group])  # [B, 3, T, H, W]
            for i, camera_latents in zip(group, call(stream, pixels)):
                latents[i] = camera_latents
        return tiling.tile(latents)


class PromptEncoder:
    """Prompt -> [text_tokens, text_dim], zero past the prompt's tokens (as training and umT5 pad)."""

    def __init__(self, encoders: EncoderChoice, text_tokens: int, device: str) -> None:
        self._text = encoders.text(device)
        self.text_tokens = text_tokens
        # One encoder serves every session of a server, each in its own thread; a fast tokenizer
        # refuses concurrent calls ("Already borrowed"), so they take turns.
        self._lock = threading.Lock()

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """-> [len(prompts), text_tokens, text_dim] float32."""
        out = []
        with self._lock:
            embeddings = self._text.encode(list(prompts))
        for emb in embeddings:
            padded = torch.zeros(self.text_tokens, emb.shape[-1])
            length = min(self.text_tokens, emb.shape[0])
            padded[:length] = emb[:length]
            out.append(padded)
        return torch.stack(out)
