"""Cameras -> one latent canvas (spec 2.1): per-camera resize, then tiling of the per-camera latents.

Every camera is resized on its own (bilinear, align_corners=False, pixels to [-1, 1]) and encoded on
its own; the latents, not the pixels, are tiled:
    side_by_side      all cameras at one size, latents concatenated along width (the default);
    robotwin_tshape   three cameras, head first: the head at full size, the two wrists at half size,
                      wrist latents side by side and stacked above the head latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lbva.errors import UserError

LAYOUTS = ("side_by_side", "robotwin_tshape")
# Latents are patchified 2x2 by the DiT and the VAE compresses 16x, so sides are multiples of 32 px.
PIXEL_MULTIPLE = 32


@dataclass(frozen=True)
class Tiling:
    """Where each camera goes: its pixel size before encoding and how the latents are tiled."""

    layout: str
    camera_sizes: tuple[tuple[int, int], ...]  # (height, width) in pixels, one per camera

    def groups(self) -> list[list[int]]:
        """Cameras that share a size, as index lists: each group is encoded as one batch."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(self.camera_sizes):
            by_size.setdefault(size, []).append(index)
        return list(by_size.values())

    def tile(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-camera latents [C, F, h_i, w_i], in camera order -> one canvas [C, F, h, w]."""
        if self.layout == "side_by_side":
            return torch.cat(list(latents), dim=-1)
        head, left, right = latents
        wrists = torch.cat([left, right], dim=-1)  # [C, F, h/2, w]
        return torch.cat([wrists, head], dim=-2)  # [C, F, 3h/2, w]

    def canvas_size(self, spatial_factor: int) -> tuple[int, int]:
        """(h, w) of the tiled latent canvas for a VAE with the given spatial compression."""
        sizes = [(h // spatial_factor, w // spatial_factor) for h, w in self.camera_sizes]
        if self.layout == "side_by_side":
            return sizes[0][0], sum(w for _, w in sizes)
        return sizes[0][0] + sizes[1][0], sizes[0][1]

    def to_dict(self) -> dict:
        return {"layout": self.layout, "camera_sizes": [list(size) for size in self.camera_sizes]}


def make_tiling(layout: str, num_cameras: int, heights: Sequence[int], widths: Sequence[int]) -> Tiling:
    """Validate a layout and the per-camera sizes it implies.

    side_by_side: `heights`/`widths` hold one value for every camera, or one per camera (all heights
    equal, since latents meet along width). robotwin_tshape: one value each, the head camera's size;
    the wrists get half of it.
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    if layout == "robotwin_tshape":
        if num_cameras != 3 or len(heights) != 1 or len(widths) != 1:
            raise UserError(f"the robotwin_tshape layout needs 3 cameras (head, left wrist, right wrist) and one "
                            f"--height/--width (the head's), got {num_cameras} cameras and sizes {heights}x{widths}")
        h, w = heights[0], widths[0]
        if h % (2 * PIXEL_MULTIPLE) or w % (2 * PIXEL_MULTIPLE):
            raise UserError(f"robotwin_tshape: the head size {h}x{w} must be a multiple of {2 * PIXEL_MULTIPLE} "
                            "so the half-size wrists stay multiples of 32")
        return Tiling(layout, ((h, w), (h // 2, w // 2), (h // 2, w // 2)))
    if len(heights) not in (1, num_cameras) or len(widths) not in (1, num_cameras):
        raise UserError(f"give one --height/--width for all cameras or one per camera ({num_cameras}), "
                        f"got {len(heights)} and {len(widths)}")
    sizes = tuple((heights[i % len(heights)], widths[i % len(widths)]) for i in range(num_cameras))
    if len({h for h, _ in sizes}) != 1:
        raise UserError(f"side_by_side tiles latents along width, so all cameras need one height; got {heights}")
    if any(h % PIXEL_MULTIPLE or w % PIXEL_MULTIPLE or h <= 0 or w <= 0 for h, w in sizes):
        raise UserError(f"camera sizes must be positive multiples of {PIXEL_MULTIPLE} px, got {list(sizes)}")
    return Tiling(layout, sizes)


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> float32 pixels [3, T, h, w] in [-1, 1], bilinearly resized to `size`."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    if tuple(video.shape[-2:]) != tuple(size):
        video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
    return video.div_(127.5).sub_(1.0).permute(1, 0, 2, 3).contiguous()  # video is our own float copy
