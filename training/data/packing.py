"""Episode windows -> packed sequences of a fixed token budget, with the per-token metadata the
mask builder and the losses need (spec 2.3: noisy and clean copies of video and actions).

A window of F latent frames costs F * (video copies * tokens per frame + 2 * actions per frame)
tokens. Windows are packed first-fit into sequences; video tokens of all windows come first, then
action tokens, each part padded to a multiple of `pad_multiple`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lbva.models.action_space import ACTION_DIM
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM, PADDING
from lbva.models.patching import action_positions, patchify, video_positions

from .samples import EpisodeSample


@dataclass(frozen=True)
class Window:
    sample: EpisodeSample
    start: int  # first latent frame
    frames: int

    @property
    def key(self) -> str:
        return f"{self.sample.key}@{self.start}+{self.frames}"


@dataclass
class TokenCost:
    """Tokens one latent frame of a sample costs in a packed sequence."""

    patch: tuple[int, int, int]
    forward_dynamics: bool

    def per_frame(self, sample: EpisodeSample) -> int:
        _, _, h, w = sample.latents.shape
        video = (h // self.patch[1]) * (w // self.patch[2])
        video_copies = 3 if self.forward_dynamics else 2
        return video_copies * video + 2 * sample.actions_per_frame


def cut_windows(sample: EpisodeSample, max_frames: int, frame_multiple: int) -> list[Window]:
    """Consecutive windows of at most max_frames frames; every cut falls on a multiple of
    frame_multiple (the largest chunk size), so no chunk is ever split across windows."""
    if max_frames < 1:
        raise ValueError("a window must hold at least one frame")
    step = (max_frames // frame_multiple) * frame_multiple or max_frames
    return [Window(sample, start, min(step, sample.num_frames - start)) for start in range(0, sample.num_frames, step)]


@dataclass
class PackedSequence:
    """One packed sequence (a batch row). Video and action parts are each [L, ...] on the CPU."""

    video_x0: torch.Tensor  # [Lv, C*pt*ph*pw] clean patches, channel-major
    video_sample: torch.Tensor  # [Lv] window index in this pack, PADDING for padding
    video_frame: torch.Tensor  # [Lv] latent frame within its window
    video_slot: torch.Tensor  # [Lv] global (window, frame) slot for per-frame noise levels
    video_role: torch.Tensor  # [Lv] CLEAN / NOISY / NOISY_FDM
    video_positions: torch.Tensor  # [Lv, 3]
    action_x0: torch.Tensor  # [La, 30]
    action_channels: torch.Tensor  # [La, 30] bool: channels the window's source fills
    action_supervised: torch.Tensor  # [La] bool: real token of a frame with a preceding frame
    action_sample: torch.Tensor
    action_frame: torch.Tensor
    action_slot: torch.Tensor
    action_role: torch.Tensor
    action_positions: torch.Tensor  # [La, 3]
    text: torch.Tensor  # [S, T, text_dim]
    window_keys: list[str]
    num_slots: int

    @property
    def real_tokens(self) -> int:
        return int((self.video_sample != PADDING).sum() + (self.action_sample != PADDING).sum())


def first_fit(windows: list[Window], budget: int, cost: TokenCost) -> list[list[Window]]:
    """Pack windows into bins of `budget` tokens, each into the first bin it fits (input order kept)."""
    bins: list[list[Window]] = []
    used: list[int] = []
    for window in windows:
        tokens = window.frames * cost.per_frame(window.sample)
        if tokens > budget:
            raise ValueError(f"window {window.key} needs {tokens} tokens, more than the budget {budget}")
        for i in range(len(bins)):
            if used[i] + tokens <= budget:
                bins[i].append(window)
                used[i] += tokens
                break
        else:
            bins.append([window])
            used.append(tokens)
    return bins


def _pad(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    extra = length - tensor.shape[0]
    if extra == 0:
        return tensor
    filler = torch.full((extra, *tensor.shape[1:]), value, dtype=tensor.dtype)
    return torch.cat([tensor, filler])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_packed_sequence(
    windows: list[Window], patch: tuple[int, int, int], pad_multiple: int, forward_dynamics: bool
) -> PackedSequence:
    """Lay out the windows' tokens: per window, video copies (noisy, clean[, noisy_fdm]) then, in
    the action part, noisy and clean actions. The first action group of every window has no
    preceding frame in the window, so it is never supervised."""
    video_roles = [NOISY, CLEAN] + ([NOISY_FDM] if forward_dynamics else [])
    v_parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("x0", "sample", "frame", "slot", "role", "pos")}
    a_parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("x0", "channels", "supervised", "sample", "frame", "slot", "role", "pos")
    }
    slot_base = 0
    for index, window in enumerate(windows):
        sample = window.sample
        latents = sample.latents[:, window.start : window.start + window.frames]
        c, f, h, w = latents.shape
        grid_h, grid_w = h // patch[1], w // patch[2]
        tokens = patchify(latents.unsqueeze(0), patch)[0]  # [f*gh*gw, D]
        frame = torch.arange(f).repeat_interleave(grid_h * grid_w)
        positions = video_positions(f, grid_h, grid_w)
        for role in video_roles:
            v_parts["x0"].append(tokens)
            v_parts["sample"].append(torch.full_like(frame, index))
            v_parts["frame"].append(frame)
            v_parts["slot"].append(frame + slot_base)
            v_parts["role"].append(torch.full_like(frame, role))
            v_parts["pos"].append(positions)

        n = sample.actions_per_frame
        actions = sample.actions[:, window.start : window.start + window.frames]  # [30, f, n]
        action_tokens = actions.permute(1, 2, 0).reshape(f * n, ACTION_DIM)
        action_frame = torch.arange(f).repeat_interleave(n)
        channels = sample.action_mask[None, :].expand(f * n, ACTION_DIM)
        for role in (NOISY, CLEAN):
            a_parts["x0"].append(action_tokens)
            a_parts["channels"].append(channels)
            a_parts["supervised"].append(action_frame > 0)
            a_parts["sample"].append(torch.full_like(action_frame, index))
            a_parts["frame"].append(action_frame)
            a_parts["slot"].append(action_frame + slot_base)
            a_parts["role"].append(torch.full_like(action_frame, role))
            a_parts["pos"].append(action_positions(f, n))
        slot_base += f

    video = {k: torch.cat(v) for k, v in v_parts.items()}
    action = {k: torch.cat(v) for k, v in a_parts.items()}
    lv = _round_up(video["x0"].shape[0], pad_multiple)
    la = _round_up(action["x0"].shape[0], pad_multiple)
    return PackedSequence(
        video_x0=_pad(video["x0"], lv, 0.0),
        video_sample=_pad(video["sample"], lv, PADDING),
        video_frame=_pad(video["frame"], lv, 0),
        video_slot=_pad(video["slot"], lv, 0),
        video_role=_pad(video["role"], lv, CLEAN),
        video_positions=_pad(video["pos"], lv, 0.0),
        action_x0=_pad(action["x0"], la, 0.0),
        action_channels=_pad(action["channels"], la, False),
        action_supervised=_pad(action["supervised"], la, False),
        action_sample=_pad(action["sample"], la, PADDING),
        action_frame=_pad(action["frame"], la, 0),
        action_slot=_pad(action["slot"], la, 0),
        action_role=_pad(action["role"], la, CLEAN),
        action_positions=_pad(action["pos"], la, 0.0),
        text=torch.stack([w.sample.text_emb for w in windows]),
        window_keys=[w.key for w in windows],
        num_slots=slot_base,
    )
