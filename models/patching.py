"""Video latents <-> tokens, and the RoPE grid ids of video and action tokens (spec 2.1-2.2)."""

from __future__ import annotations

import torch


def patchify(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F'*H'*W', C*pt*ph*pw]; tokens in (frame, row, col) order, features
    channel-major (c, pt, ph, pw), matching the Conv3d patch embedding reshaped to a Linear."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b f' h' w' c pt ph pw
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Output tokens [B, F'*H'*W', pt*ph*pw*C] (patch-major, as the head emits) -> [B, C, F, H, W]."""
    b = tokens.shape[0]
    f, h, w = grid
    pt, ph, pw = patch
    x = tokens.reshape(b, f, h, w, pt, ph, pw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b c f pt h ph w pw
    return x.reshape(b, x.shape[1], f * pt, h * ph, w * pw)


def input_to_output_order(tokens: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Reorder token features from the input's (c, p) order to the head's (p, c) order."""
    volume = patch[0] * patch[1] * patch[2]
    return tokens.unflatten(-1, (-1, volume)).transpose(-1, -2).flatten(-2)


def video_positions(frames: int, height: int, width: int, frame_offset: float = 0.0) -> torch.Tensor:
    """[frames*height*width, 3] integer (frame, row, col) ids, in token order."""
    f, i, j = torch.meshgrid(
        torch.arange(frames, dtype=torch.float64) + frame_offset,
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack([f, i, j], dim=-1).reshape(-1, 3)


def action_positions(frames: int, steps_per_frame: int, frame_offset: float = 0.0) -> torch.Tensor:
    """[frames*N, 3]: action step k (1..N) of latent frame f sits at frame position f + k/(N+1),
    strictly between video frames f and f+1, with row = col = -1."""
    f = torch.arange(frames, dtype=torch.float64)[:, None] + frame_offset
    k = torch.arange(1, steps_per_frame + 1, dtype=torch.float64)[None, :]
    frame_pos = (f + k / (steps_per_frame + 1)).reshape(-1)
    off_grid = torch.full_like(frame_pos, -1.0)
    return torch.stack([frame_pos, off_grid, off_grid], dim=-1)
