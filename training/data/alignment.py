"""Frame sampling and action alignment of spec 2.1, shared by data preparation's episode encoding.

Frames are sampled every `stride` raw steps; actions stay at the raw rate, N = 4 * stride per latent
frame, aligned so that group f leads from latent frame f-1 into latent frame f.
"""

from __future__ import annotations

import numpy as np

from lbva.errors import UserError


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
