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

The prompt's work, once per episode. The text of an episode is fixed, so its projection to the
model width and every depth's cross-attention K/V are computed once (`EpisodeText`, at the start of
an episode) and every forward reuses them: the forward hands the model an empty text, so the
model's own cross-attention projects zero text tokens, and the cross-attention kernel (which counts
its calls per depth like the self-attention one) attends to the episode's K/V instead. The K/V
themselves come from the model's own modules (`TextProjection`, then each depth's `attn2` run on the
text with a kernel that keeps what it is given), so the numbers are those the model computes.

`CachedModel(..., reuse_prompt=False)` keeps the model's own per-forward text work (the path before
this cache), which the equality tests and bench/inference_latency.py compare against. The episode's
K/V also fold the prompt's zero padding into one key per row with a log-count bias (EpisodeText), so
each forward's cross-attention reads the prompt's length of keys instead of 512: the same softmax,
rounded differently (`fold_padding=False` keeps every padding key).

The noise levels' work, once per episode. The same shortcut holds each noise level's timestep
conditioning (`EpisodeTimesteps`): the sampler's grid repeats a few levels all episode long, so each
level is embedded the first time a forward meets it, and a stream whose tokens share one level gets
one row that the MoT's modulation broadcasts (models/mot.py StreamTime), bit for bit the numbers of
embedding every token.

CFG rows. A forward runs every text row (prompt, and the negative prompt under guidance) unless it
asks for the first `rows` only: the action loop with action guidance 1 needs the prompt row alone.
Such a forward may not store anything, since later guided forwards read every row of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from lbva.models.attention import AttentionKernel, AttentionKernels
from lbva.models.masks import CLEAN, TokenLayout, self_attention_rule
from lbva.models.mot import LingBotVA, ModelInputs, StreamTime

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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [B, L, H, D] -> [B, Lq, H, D]."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


class _KeepKeysValues:
    """A cross-attention kernel that keeps the K/V the model hands it and attends to nothing."""

    def __init__(self) -> None:
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.kept = (k, v)
        return q  # no queries: the caller passes zero tokens


@dataclass(frozen=True)
class EpisodeText:
    """The prompt's work of one episode: per depth the cross-attention K and V [B, T', H, D] of the
    projected text rows (row 0 the prompt, row 1 under CFG the negative prompt), with the padding
    folded into one key per row.

    Folding. Text rows are zero past the prompt's tokens (up to the 512 the reference pads to), and
    identical inputs give identical keys and values, so the n padding tokens of a row are one key
    seen n times: softmax weight n exp(s) = exp(s + log n). Each row keeps its prompt tokens and one
    padding key with the additive bias log n (rows shorter than the longest get -inf filler), which
    is the attention over all T tokens, padding included, as in training and the reference, at the
    cost of the prompt's length instead of 512. `bias` [B, 1, 1, T'] float32 (None: no padding)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @classmethod
    @torch.no_grad()
    def of(cls, model: LingBotVA, text: torch.Tensor, fold_padding: bool = True) -> EpisodeText:
        """text features [B, T, text_dim] -> the K/V every depth's cross-attention reads, computed by
        the model's own text projection and cross-attention modules (padding folded unless told)."""
        dtype = next(model.parameters()).dtype
        projected = model.condition_embedder.text_embedder(text.to(dtype))  # [B, T, video width]
        keys, values = [], []
        for depth in model.depths():
            keep = _KeepKeysValues()
            depth.entry.attn2(projected[:, :0], projected, keep)
            keys.append(keep.kept[0])
            values.append(keep.kept[1])
        padding = (text == 0).all(-1).cpu()  # [B, T]
        if not fold_padding or not bool(padding.any()):
            return cls(tuple(keys), tuple(values))
        kept, counts = [], []
        for row in padding:
            prompt = torch.nonzero(~row).flatten()
            pad = torch.nonzero(row).flatten()
            kept.append(torch.cat([prompt, pad[:1]]))
            counts.append(torch.cat([torch.ones(len(prompt)), torch.full((min(len(pad), 1),), float(len(pad)))]))
        width = max(len(k) for k in kept)
        index = torch.stack([torch.nn.functional.pad(k, (0, width - len(k))) for k in kept]).to(text.device)
        bias = torch.stack([torch.nn.functional.pad(c.log(), (0, width - len(c)), value=float("-inf")) for c in counts])

        def fold(per_depth: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            gather = index[:, :, None, None]
            return tuple(t.gather(1, gather.expand(-1, -1, *t.shape[2:])) for t in per_depth)

        return cls(fold(keys), fold(values), bias[:, None, None, :].to(text.device))


_GEMM_ROWS = 8


class EpisodeTimesteps:
    """Each noise level's timestep conditioning (the model's ConditionEmbedders: sinusoid, MLP, the
    6 x width projection), computed the first time an episode's forward meets that level and reused
    by every later forward: the sampler's grid repeats the same few levels all episode long, and
    a forward's tokens share one or two of them, where the model itself embeds every token."""

    def __init__(self, model: LingBotVA) -> None:
        self.embedders = (model.condition_embedder, model.condition_embedder_action)
        self.seen: tuple[dict[float, StreamTime], dict[float, StreamTime]] = ({}, {})

    @torch.no_grad()
    def of(self, inputs: ModelInputs) -> tuple[StreamTime, StreamTime]:
        """-> the (video, action) conditioning of the inputs' timesteps (see StreamTime): [B, 1, ...]
        when a modality's tokens share one level, else one row per token."""
        return (self._stream(0, inputs.video_timesteps), self._stream(1, inputs.action_timesteps))

    def _stream(self, which: int, timesteps: torch.Tensor) -> StreamTime:
        embedder, seen = self.embedders[which], self.seen[which]
        if timesteps.numel() == 0:
            return StreamTime(*embedder(timesteps))
        levels, inverse = torch.unique(timesteps, return_inverse=True)
        values = levels.tolist()
        missing = [v for v in values if v not in seen]
        if missing:
            # At least _GEMM_ROWS rows: CPU BLAS rounds a matrix product of 1-3 rows differently
            # from the many-row product of a full forward, from 4 rows on alike (bit for bit).
            rows = missing + missing[-1:] * (_GEMM_ROWS - len(missing))
            temb, proj = embedder(torch.tensor(rows, dtype=timesteps.dtype, device=timesteps.device)[None])
            seen.update((v, StreamTime(temb[:, i:i + 1], proj[:, i:i + 1])) for i, v in enumerate(missing))
        batch, length = timesteps.shape
        if len(values) == 1:
            return seen[values[0]].expand(batch, 1)
        temb = torch.cat([seen[v].temb for v in values], dim=1)[0]  # [levels, W]
        proj = torch.cat([seen[v].proj for v in values], dim=1)[0]  # [levels, 6, W]
        return StreamTime(temb[inverse], proj[inverse])


class _EpisodeCrossAttention:
    """The cross-attention kernel of one forward: call i is depth i, which attends to the episode's
    K/V of depth i (first `rows` rows); the model's own K/V are of the empty text it was handed."""

    def __init__(self, text: EpisodeText, rows: int) -> None:
        self.text = text
        self.rows = rows
        self.depth = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.depth >= len(self.text.keys) or k.shape[1] != 0:
            raise RuntimeError("the model's cross-attention did not run once per depth on the empty text")
        keys, values = self.text.keys[self.depth][: self.rows], self.text.values[self.depth][: self.rows]
        self.depth += 1
        if self.text.bias is None:
            return _sdpa(q, keys.to(q.dtype), values.to(q.dtype))
        # The folded padding's log-count bias in float32 (bfloat16 would round log n by up to 2%).
        return _sdpa(q.float(), keys.float(), values.float(), self.text.bias[: self.rows]).to(q.dtype)


class _CachedSelfAttention:
    """The self-attention kernel of one forward: call i is depth i (see the module docstring)."""

    def __init__(self, cache: KVCache, reservation: Reservation, ranges: Sequence[tuple[int, int]],
                 mask: torch.Tensor | None, rows: int) -> None:
        self.cache = cache
        self.reservation = reservation
        self.ranges = ranges  # token range of each group in the joint sequence
        self.mask = mask  # [Lq, n_cached + Lq] bool, None when every query sees every key
        self.rows = rows  # CFG rows this forward runs: the first `rows` of the cache
        self.depth = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.depth >= self.cache.num_layers:
            raise RuntimeError(f"self-attention called {self.depth + 1} times in one forward; the cache has "
                               f"{self.cache.num_layers} depths")
        keys, values = self.cache.read_with(self.depth, self.reservation, k, v)  # [rows, n + Lq, H, D]
        out = _sdpa(q.to(keys.dtype), keys, values, self.mask).to(q.dtype)
        for slots, (start, end) in zip(self.reservation.group_slots, self.ranges):
            if slots is not None:
                self.cache.store(self.depth, slots, k[:, start:end], v[:, start:end])
        self.depth += 1
        return out


class CachedModel:
    """The model plus its KV cache and the episode's text (one row per CFG batch row)."""

    def __init__(self, model: LingBotVA, cache: KVCache, text: torch.Tensor, reuse_prompt: bool = True,
                 fold_padding: bool = True) -> None:
        """text [B, T, text_dim]: row 0 the prompt, row 1 (with CFG) the negative prompt.
        reuse_prompt: compute the prompt's work (EpisodeText) and each noise level's conditioning
        (EpisodeTimesteps) once per episode, else in every forward;
        fold_padding: with it, fold the text padding into one key per row (EpisodeText)."""
        self.model = model
        self.cache = cache
        self.text = text
        self.episode_text = EpisodeText.of(model, text, fold_padding) if reuse_prompt else None
        self.episode_timesteps = EpisodeTimesteps(model) if reuse_prompt else None
        self.device = text.device

    @property
    def batch(self) -> int:
        return self.text.shape[0]

    def forward(self, groups: Sequence[TokenGroup], rows: int | None = None) -> list[torch.Tensor]:
        """Run the groups through the model, writing each into the cache by its write mode.
        rows: run only the first `rows` CFG rows (default all); such a forward may not store.

        Returns, per group in the given order, the model's prediction [rows, L, D_out] (video in the
        head's patch-major order).
        """
        return run_batched(self.model, [self.prepare(groups, rows)])[0]

    def prepare(self, groups: Sequence[TokenGroup], rows: int | None = None) -> PreparedForward:
        """Everything one forward of these groups needs, with its cache slots reserved (see forward);
        `run_batched` runs it, alone or beside other episodes' prepared forwards."""
        rows = self.batch if rows is None else rows
        if rows < self.batch and any(g.write != WriteMode.TRANSIENT for g in groups):
            raise ValueError("a forward over some CFG rows cannot store: later forwards read every row")
        # The model's token order: video groups, then action groups, each kept in the given order.
        order = sorted(range(len(groups)), key=lambda i: groups[i].modality == "action")
        ordered = [groups[i] for i in order]
        span: dict[int, tuple[int, int]] = {}
        start = 0
        for i in order:
            span[i] = (start, start + len(groups[i]))
            start += len(groups[i])
        if any(g.write != WriteMode.TRANSIENT and g.role != CLEAN for g in ordered):
            raise ValueError("only clean tokens (history) can be stored in the KV cache")
        reservation = self.cache.reserve([len(g) for g in ordered], [g.write for g in ordered],
                                         [g.chunk_id for g in ordered])
        try:
            mask = self._mask(ordered, reservation)
            video = [g for g in ordered if g.modality == "video"]
            action = [g for g in ordered if g.modality == "action"]
            inputs = self._inputs(video, action, rows)
            time = None if self.episode_timesteps is None else self.episode_timesteps.of(inputs)
        except BaseException:
            self.cache.abort(reservation)
            raise
        attention = _CachedSelfAttention(self.cache, reservation, [span[i] for i in order], mask, rows)
        cross = _sdpa if self.episode_text is None else _EpisodeCrossAttention(self.episode_text, rows)
        return PreparedForward(self, list(groups), [span[i] for i in range(len(groups))], inputs, time,
                               attention, cross)

    def _inputs(self, video: list[TokenGroup], action: list[TokenGroup], rows: int) -> ModelInputs:
        config = self.model.config
        dtype = next(self.model.parameters()).dtype
        device = self.device

        def stack(parts: list[TokenGroup], field: str, width: int | None) -> torch.Tensor:
            if parts:
                joined = torch.cat([getattr(g, field) for g in parts])
            else:
                joined = torch.zeros((0,) if width is None else (0, width))
            return joined.to(device).expand(rows, *joined.shape)

        return ModelInputs(
            video_tokens=stack(video, "tokens", config.video_token_dim).to(dtype),
            video_timesteps=stack(video, "timesteps", None).float(),
            video_positions=stack(video, "positions", 3),
            action_tokens=stack(action, "tokens", config.action_dim).to(dtype),
            action_timesteps=stack(action, "timesteps", None).float(),
            action_positions=stack(action, "positions", 3),
            # With the EpisodeText the model gets no text: its cross-attention kernel reads the episode's.
            text=(self.text[:rows] if self.episode_text is None else self.text[:rows, :0]).to(dtype),
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
        return torch.cat([per_query, sees_current], dim=1).to(self.device)


@dataclass(eq=False)
class PreparedForward:
    """One episode's forward, ready to run: the groups (in the caller's order) and their token spans
    in the model's order, the model inputs, and the kernels bound to the episode's cache and text."""

    owner: CachedModel
    groups: list[TokenGroup]
    spans: list[tuple[int, int]]
    inputs: ModelInputs
    time: tuple[StreamTime, StreamTime] | None  # the inputs' timestep conditioning, None: the model's
    attention: _CachedSelfAttention
    cross: AttentionKernel

    @property
    def rows(self) -> int:
        return self.inputs.video_tokens.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """What must agree for forwards of different episodes to share one model call: the video,
        action and text token counts (the CFG rows may differ)."""
        i = self.inputs
        return i.video_tokens.shape[1], i.action_tokens.shape[1], i.text.shape[1]

    def check(self) -> None:
        depth, layers = self.attention.depth, self.owner.cache.num_layers
        if depth != layers:
            raise RuntimeError(f"the model called self-attention {depth} times in one forward, "
                               f"expected once per depth ({layers})")

    def finish(self, video_out: torch.Tensor, action_out: torch.Tensor) -> list[torch.Tensor]:
        """Make the stored groups readable; -> the groups' predictions from this forward's rows."""
        self.owner.cache.commit(self.attention.reservation)
        joint_video = video_out.shape[1]
        return [video_out[:, start:end] if group.modality == "video"
                else action_out[:, start - joint_video:end - joint_video]
                for group, (start, end) in zip(self.groups, self.spans)]

    def abort(self) -> None:
        self.owner.cache.abort(self.attention.reservation)


class _SplitKernel:
    """One attention kernel over the batch of several episodes' forwards: each episode's rows go to its
    own kernel (its cache, mask and text), and the outputs are joined again in batch order."""

    def __init__(self, kernels: Sequence[AttentionKernel], rows: Sequence[int]) -> None:
        self.kernels = kernels
        self.bounds = torch.tensor([0, *rows]).cumsum(0).tolist()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        parts = [kernel(q[a:b], k[a:b], v[a:b])
                 for kernel, a, b in zip(self.kernels, self.bounds[:-1], self.bounds[1:])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def run_batched(model: LingBotVA, forwards: Sequence[PreparedForward]) -> list[list[torch.Tensor]]:
    """Run prepared forwards of one or more episodes as one model call (their CFG rows stacked on the
    batch axis; every other layer is per token, so each episode's numbers are its own; attention runs
    per episode on its own cache). They must agree on `shape`. -> per forward, per group, the
    prediction [rows, L, D_out]. A failure frees every forward's reserved slots."""
    try:
        if len({f.shape for f in forwards}) != 1:
            raise ValueError(f"forwards of token counts {sorted({f.shape for f in forwards})} cannot share one call")
        if len(forwards) == 1:
            inputs, kernels = forwards[0].inputs, AttentionKernels(forwards[0].attention, forwards[0].cross)
            time = forwards[0].time
        else:
            fields = {name: torch.cat([getattr(f.inputs, name) for f in forwards])
                      for name in ModelInputs.__dataclass_fields__}
            inputs = ModelInputs(**fields)
            rows = [f.rows for f in forwards]
            kernels = AttentionKernels(_SplitKernel([f.attention for f in forwards], rows),
                                       _SplitKernel([f.cross for f in forwards], rows))
            time = _joined_time(forwards)
        video_out, action_out = model(inputs, kernels, time)
        for f in forwards:
            f.check()
        bounds = torch.tensor([0, *(f.rows for f in forwards)]).cumsum(0).tolist()
    except BaseException:
        for f in forwards:
            f.abort()
        raise
    return [f.finish(video_out[a:b], action_out[a:b]) for f, a, b in zip(forwards, bounds[:-1], bounds[1:])]


def _joined_time(forwards: Sequence[PreparedForward]) -> tuple[StreamTime, StreamTime] | None:
    """The timestep conditioning of forwards stacked on the batch axis (each expanded to one row per
    token first); None if any forward leaves it to the model."""
    if any(f.time is None for f in forwards):
        return None
    first = forwards[0].inputs
    joined = []
    for stream, length in enumerate((first.video_timesteps.shape[1], first.action_timesteps.shape[1])):
        parts = [f.time[stream].expand(f.rows, length) for f in forwards]
        joined.append(StreamTime(torch.cat([p.temb for p in parts]), torch.cat([p.proj for p in parts])))
    return joined[0], joined[1]
