"""One model forward over token groups, attending to the KV cache and writing into it.

A forward carries one or more token groups (the noisy video of a chunk, the observed actions of the
previous chunk, ...). The model takes video tokens first and action tokens after them, so the groups
are laid out video groups first, then action groups, each in the order given. Which current token
sees which is decided by the training mask rule (models/masks.py) applied to the groups' chunk ids
and roles, so a fused forward reproduces exactly the visibility of spec 2.3. Cached slots are clean
tokens that remember their chunk id, and the same rule decides which queries see them. The loops of
runtime.py only ever cache what every later query may see (the reference reads its cache without a
mask), so that part is all-true there and costs one small rule evaluation per forward; a loop that
broke the invariant would get the training visibility rather than a silent leak. The attention
window is the cache's eviction, as in the reference.

Layer identity. The model calls `kernels.self_attention(q, k, v)` exactly once per depth, in depth
order, and never chooses kernels itself (models/mot.py). `_CachedSelfAttention` therefore counts its
calls within one forward: call i is depth i. Every forward gets a fresh kernel (count 0), and the
forward fails if the count is not num_layers at its end or a call arrives past the last depth, so a
model that changed this contract (e.g. recomputation under activation checkpointing, which inference
never uses) is caught instead of silently mixing depths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from lbva.models.attention import AttentionKernels
from lbva.models.masks import CLEAN, TokenLayout, self_attention_rule
from lbva.models.mot import LingBotVA, ModelInputs

from .kv_cache import KVCache, Reservation, WriteMode

Modality = Literal["video", "action"]
# Window of the current tokens' mask in chunk-id units: the cache already is the sliding window, and
# one forward never spans more than a few chunks.
_UNBOUNDED_WINDOW = 1 << 30


@dataclass(eq=False)
class TokenGroup:
    """Tokens of one modality and one chunk, shared by every CFG batch row.

    role is models.masks.CLEAN (history: observed, or a finished prediction), NOISY (being denoised)
    or NOISY_FDM (video being re-imagined from the actions of its own chunk).
    """

    modality: Modality
    chunk: int
    role: int
    tokens: torch.Tensor  # [L, D]: patchified latents (channel-major) or 30-d actions
    timesteps: torch.Tensor  # [L] sigma * 1000
    positions: torch.Tensor  # [L, 3]
    write: WriteMode

    @property
    def chunk_id(self) -> int:
        """The reference's fid: 2c for video, 2c + 1 for actions."""
        return 2 * self.chunk + (self.modality == "action")

    def __len__(self) -> int:
        return self.tokens.shape[0]


class _CachedSelfAttention:
    """The self-attention kernel of one forward: call i is depth i (see the module docstring)."""

    def __init__(self, cache: KVCache, reservation: Reservation, ranges: Sequence[tuple[int, int]],
                 mask: torch.Tensor | None) -> None:
        self.cache = cache
        self.reservation = reservation
        self.ranges = ranges  # token range of each group in the joint sequence
        self.mask = mask  # [Lq, n_cached + Lq] bool, None when every query sees every key
        self.depth = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.depth >= self.cache.num_layers:
            raise RuntimeError(f"self-attention called {self.depth + 1} times in one forward; the cache has "
                               f"{self.cache.num_layers} depths")
        cached_k, cached_v = self.cache.read(self.depth, self.reservation)
        keys = torch.cat([cached_k.to(k.dtype), k], dim=1)
        values = torch.cat([cached_v.to(v.dtype), v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=self.mask).transpose(1, 2)
        for slots, (start, end) in zip(self.reservation.group_slots, self.ranges):
            if slots is not None:
                self.cache.store(self.depth, slots, k[:, start:end], v[:, start:end])
        self.depth += 1
        return out


def _cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Every token sees all text tokens, zero padding included, as in training and the reference.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class CachedModel:
    """The model plus its KV cache and the episode's text rows (one per CFG batch row)."""

    def __init__(self, model: LingBotVA, cache: KVCache, text: torch.Tensor) -> None:
        """text [B, T, text_dim]: row 0 the prompt, row 1 (with CFG) the negative prompt."""
        self.model = model
        self.cache = cache
        self.text = text

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    @torch.no_grad()
    def forward(self, groups: Sequence[TokenGroup]) -> list[torch.Tensor]:
        """Run the groups through the model, writing each into the cache by its write mode.

        Returns, per group in the given order, the model's prediction [B, L, D_out] (video in the
        head's patch-major order).
        """
        # The model's token order: video groups, then action groups, each kept in the given order.
        order = sorted(range(len(groups)), key=lambda i: groups[i].modality == "action")
        ordered = [groups[i] for i in order]
        span: dict[int, tuple[int, int]] = {}
        start = 0
        for i in order:
            span[i] = (start, start + len(groups[i]))
            start += len(groups[i])
        ranges = [span[i] for i in order]
        if any(g.write != WriteMode.TRANSIENT and g.role != CLEAN for g in ordered):
            raise ValueError("only clean tokens (history) can be stored in the KV cache")
        reservation = self.cache.reserve([len(g) for g in ordered], [g.write for g in ordered],
                                         [g.chunk_id for g in ordered])
        mask = self._mask(ordered, reservation)
        attention = _CachedSelfAttention(self.cache, reservation, ranges, mask)
        try:
            video = [g for g in ordered if g.modality == "video"]
            action = [g for g in ordered if g.modality == "action"]
            kernels = AttentionKernels(attention, _cross_attention)
            video_out, action_out = self.model(self._inputs(video, action), kernels)
            if attention.depth != self.cache.num_layers:
                raise RuntimeError(f"the model called self-attention {attention.depth} times in one forward, "
                                   f"expected once per depth ({self.cache.num_layers})")
        except BaseException:
            self.cache.abort(reservation)
            raise
        self.cache.commit(reservation)
        joint_video = video_out.shape[1]
        return [video_out[:, span[i][0]:span[i][1]] if group.modality == "video"
                else action_out[:, span[i][0] - joint_video:span[i][1] - joint_video]
                for i, group in enumerate(groups)]

    def _inputs(self, video: list[TokenGroup], action: list[TokenGroup]) -> ModelInputs:
        config = self.model.config
        dtype = next(self.model.parameters()).dtype
        device = self.text.device

        def stack(parts: list[TokenGroup], field: str, width: int | None) -> torch.Tensor:
            if parts:
                joined = torch.cat([getattr(g, field) for g in parts])
            else:
                joined = torch.zeros((0,) if width is None else (0, width))
            return joined.to(device).expand(self.batch, *joined.shape)

        return ModelInputs(
            video_tokens=stack(video, "tokens", config.video_token_dim).to(dtype),
            video_timesteps=stack(video, "timesteps", None).float(),
            video_positions=stack(video, "positions", 3),
            action_tokens=stack(action, "tokens", config.action_dim).to(dtype),
            action_timesteps=stack(action, "timesteps", None).float(),
            action_positions=stack(action, "positions", 3),
            text=self.text.to(dtype),
        )

    def _mask(self, ordered: list[TokenGroup], reservation: Reservation) -> torch.Tensor | None:
        """The training rule from the current tokens to [readable cached slots; current tokens]:
        [Lq, n + Lq] bool on the model's device, or None when it allows everything."""
        sizes = torch.tensor([len(g) for g in ordered])
        group_fid = torch.tensor([g.chunk_id for g in ordered])
        group_role = torch.tensor([g.role for g in ordered])
        # Against the cache: every cached token is clean, so its chunk id decides; evaluate the rule
        # once per (query group, distinct cached chunk id) and expand only if something is hidden.
        cached_fids, slot_of = torch.unique(reservation.readable_chunk_ids, return_inverse=True)
        keys = TokenLayout(torch.zeros(1, len(cached_fids) + len(ordered), dtype=torch.long),
                           torch.cat([cached_fids, group_fid])[None],
                           torch.cat([torch.full_like(cached_fids, CLEAN), group_role])[None], _UNBOUNDED_WINDOW)
        group_rows = torch.arange(len(ordered)) + len(cached_fids)
        sees_cached = self_attention_rule(keys, 0, group_rows[:, None], torch.arange(len(cached_fids))[None, :])
        # Among the current tokens (few), token by token.
        fid, role = group_fid.repeat_interleave(sizes), group_role.repeat_interleave(sizes)
        current = TokenLayout(torch.zeros_like(fid)[None], fid[None], role[None], _UNBOUNDED_WINDOW)
        tokens = torch.arange(len(fid))
        sees_current = self_attention_rule(current, 0, tokens[:, None], tokens[None, :])
        if bool(sees_cached.all()) and bool(sees_current.all()):
            return None
        per_query = sees_cached[:, slot_of].repeat_interleave(sizes, dim=0)  # [Lq, n]
        return torch.cat([per_query, sees_current], dim=1).to(self.text.device)
