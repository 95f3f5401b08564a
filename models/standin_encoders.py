"""Light, deterministic stand-ins for the Wan2.2 VAE and the umT5 text encoder.

They keep the real encoders' shapes and conventions (48 latent channels, 16x spatial and 4x causal
temporal compression with the first frame encoded alone; text embeddings zero past the prompt
length) so the demo pipeline trains in minutes on a CPU, and the real encoders can replace them
without touching anything downstream. They carry no learned weights.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch

from lbva.errors import UserError


class StandInVideoEncoder:
    """Frames -> latents by fixed pooling: [T, H, W, 3] uint8 -> [48, 1 + (T-1)/4, H/16, W/16] float32.

    Temporally, frame 0 is kept alone and each following group of 4 frames is averaged (the causal
    VAE's 1 + 4k rule). Spatially, pixels are average-pooled 4x4 and then each 4x4 block of pooled
    cells (one 16x16 pixel block) is unshuffled into channels. Channel order: c = rgb * 16 + dy * 4 + dx,
    where rgb is the colour channel and (dy, dx) the pooled cell's row and column inside the 16x16 block.
    """

    z_dim = 48
    spatial_factor = 16
    temporal_factor = 4
    # Pooled pixels in [-1, 1] of the demo's pushing world spread by about 0.26 (per latent channel
    # 0.21-0.29); dividing by 0.25 gives latents of about unit variance (0.7-1.4 per channel), as the
    # real VAE's per-channel normalisation does. Latents of a few tenths would make the flow-matching
    # video loss mostly noise prediction (docs/benchmarks.md, the video objective's diagnosis).
    latent_scale = 0.25

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] with (T-1) % 4 == 0 and H, W multiples of 32 -> [48, F, H/16, W/16]."""
        video = torch.as_tensor(frames)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise UserError(f"video encoder expects uint8 frames [T, H, W, 3], got {video.dtype} "
                            f"{tuple(video.shape)}")
        t, h, w, _ = video.shape
        if t < 1 or (t - 1) % self.temporal_factor:
            raise UserError(f"video encoder needs 1 + 4k frames, got {t} ((T - 1) % 4 = {(t - 1) % 4})")
        if h % 32 or w % 32:
            raise UserError(f"video encoder needs height and width that are multiples of 32, got {h}x{w}")
        pixels = video.float().div_(127.5).sub_(1.0)  # in place: one buffer, the same numbers
        k = (t - 1) // self.temporal_factor
        groups = pixels[1:].reshape(k, self.temporal_factor, h, w, 3).mean(1)
        pixels = torch.cat([pixels[:1], groups])  # [F, H, W, 3]
        f = k + 1
        pooled = pixels.reshape(f, h // 4, 4, w // 4, 4, 3).mean((2, 4))  # [F, H/4, W/4, 3]
        lh, lw = h // self.spatial_factor, w // self.spatial_factor
        latents = pooled.reshape(f, lh, 4, lw, 4, 3).permute(5, 2, 4, 0, 1, 3)  # [3, dy, dx, F, h, w]
        return (latents.reshape(self.z_dim, f, lh, lw) / self.latent_scale).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Approximate inverse for viewing: [48, F, h, w] -> uint8 [F, 16h, 16w, 3], one image per latent frame."""
        if latents.ndim != 4 or latents.shape[0] != self.z_dim:
            raise UserError(f"video decoder expects latents [48, F, h, w], got {tuple(latents.shape)}")
        _, f, lh, lw = latents.shape
        cells = (latents.float() * self.latent_scale).reshape(3, 4, 4, f, lh, lw)
        pooled = cells.permute(3, 4, 1, 5, 2, 0).reshape(f, lh * 4, lw * 4, 3)  # [F, H/4, W/4, 3]
        pixels = pooled.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
        return ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class StandInTextEncoder:
    """Text -> [max_tokens, text_dim] float32 embeddings from a fixed seeded table, zero past the prompt.

    Lower-cased words are tokens; each maps to a row of a seeded N(0, 1) table through a stable hash,
    so the same text gives the same embedding in every process and on every machine.
    """

    vocab_size = 32_000

    def __init__(self, text_dim: int, max_tokens: int, seed: int = 0) -> None:
        if text_dim < 1 or max_tokens < 1:
            raise UserError(f"text encoder needs text_dim >= 1 and max_tokens >= 1, got {text_dim}, {max_tokens}")
        self.text_dim = text_dim
        self.max_tokens = max_tokens
        self.seed = seed
        self._rows: dict[int, np.ndarray] = {}

    def token_ids(self, text: str) -> list[int]:
        """Stable token ids of the text's lower-cased words, truncated to max_tokens."""
        words = re.findall(r"\w+", text.lower())[: self.max_tokens]
        return [int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % self.vocab_size
                for word in words]

    def encode(self, text: str) -> torch.Tensor:
        """Embed a prompt: [max_tokens, text_dim] float32, rows past the number of words are zero."""
        out = np.zeros((self.max_tokens, self.text_dim), np.float32)
        for position, token in enumerate(self.token_ids(text)):
            out[position] = self._row(token)
        return torch.from_numpy(out)

    def _row(self, token: int) -> np.ndarray:
        # Rows are drawn on first use from a generator keyed by (seed, token): the table is fixed but
        # never materialised, which matters at umT5's width of 4096.
        if token not in self._rows:
            rng = np.random.default_rng([self.seed, token])
            self._rows[token] = rng.standard_normal(self.text_dim).astype(np.float32)
        return self._rows[token]
