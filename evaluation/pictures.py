"""Pictures of imagined rollouts: latents decoded with the codec the data was prepared with, laid
out as ground truth | imagined | difference, one image per latent frame; a PNG strip (frames left
to right) and an mp4 (frames in time) per rollout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.image import imsave

from lbva.models.encoders import WanVideoEncoder
from lbva.models.standin_encoders import StandInVideoEncoder
from lbva.training.data.demo_world import write_mp4

STRIP_FRAMES = 8  # latent frames in a PNG strip


class VideoDecoder:
    """Latents [z, F, h, w] -> uint8 images [F, H, W, 3], one per latent frame."""

    def __init__(self, decode) -> None:
        self._decode = decode

    @classmethod
    def for_card(cls, card: dict, vae: Path | None) -> VideoDecoder | None:
        """The decoder of a prepared dataset's encoders (card.json); the real Wan2.2 VAE needs its
        folder (`vae`), which the card does not record. None when there is no way to decode."""
        kind = card.get("encoders", {}).get("kind")
        if kind == "standin":
            return cls(StandInVideoEncoder().decode)
        if kind == "real" and vae is not None:
            wan = WanVideoEncoder(vae, "cpu")
            return cls(wan.decode_frames)
        return None

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        return np.asarray(self._decode(latents.float()))


def comparison_frames(decoder: VideoDecoder, truth: torch.Tensor, imagined: torch.Tensor) -> np.ndarray:
    """[F, H, 3W, 3] uint8: ground truth | imagined | absolute difference per latent frame."""
    a, b = decoder(truth).astype(np.int16), decoder(imagined).astype(np.int16)
    difference = np.abs(a - b)
    return np.concatenate([a, b, difference], axis=2).astype(np.uint8)


def strip(frames: np.ndarray) -> np.ndarray:
    """[F, H, 3W, 3] comparison frames -> one image [3H, min(F, STRIP_FRAMES) * W, 3]: the rows are
    ground truth, imagined and difference, the columns latent frames."""
    f, h, w3, _ = frames[:STRIP_FRAMES].shape
    w = w3 // 3
    rows = [np.concatenate(list(frames[:STRIP_FRAMES, :, i * w:(i + 1) * w]), axis=1) for i in range(3)]
    return np.concatenate(rows, axis=0)


def write_pictures(decoder: VideoDecoder, rollouts: list, out: Path) -> list[str]:
    """Per (source, key, truth, imagined) rollout: OUT/pictures/SOURCE/KEY.png and .mp4."""
    written = []
    for source, key, truth, imagined in rollouts:
        frames = comparison_frames(decoder, truth, imagined)
        folder = out / "pictures" / source
        folder.mkdir(parents=True, exist_ok=True)
        imsave(folder / f"{key}.png", strip(frames))
        even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        write_mp4(folder / f"{key}.mp4", even, fps=2)
        written += [str(folder / f"{key}.png"), str(folder / f"{key}.mp4")]
    return written
