"""Model FLOPs of a LingBot-VA training step, from the model's shapes and the packed sequence.

The project's one FLOPs convention: `lbva plan` (predicted MFU), bench/step_throughput.py (measured
MFU) and bench/data_throughput.py (what one GPU consumes) all divide by `training_flops_per_token`.
It counts "model FLOPs", the work the model needs, not what the hardware does:
- 2 FLOPs per multiply-add of every matrix multiply of the forward, each applied to the tokens it
  really sees: a stream's block weights to that stream's tokens, the text projections and the
  cross-attention k/v to the text tokens, embedders and heads to their modality's tokens;
- attention QK^T and PV only over the (query, key) pairs the spec 2.3 mask allows, not the whole
  128 x 128 blocks a block-sparse kernel visits; cross-attention over each token's own text;
- training = 3 x forward (backward computes input and weight gradients of every matmul); no
  activation recompute, no elementwise work (norms, softmax, RoPE, the optimizer);
- per real (non-padding) token of the sequence.
It is not "6 x parameters + attention": that charges every parameter to every token (the action
stream's weights to video tokens, the text projection to every sequence token), 35.4 against this
count's 28.1 GFLOP/token for the 5B MoT at 10K tokens, so MFUs of the two do not compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lbva.models.config import ModelConfig
from lbva.models.masks import CLEAN, NOISY, NOISY_FDM, TokenLayout, self_attention_rule


@dataclass(frozen=True)
class SequenceMix:
    """What one packed sequence holds, in the layout of training/packing.py.

    Each latent frame of a window costs video_copies * video_tokens_per_frame (noisy, clean and,
    with the forward-dynamics loss, a second noisy copy) + 2 * actions_per_frame (noisy and clean)
    tokens. Windows are `window_frames` long, shortened to what the budget holds (as PackedStream
    does), and as many whole windows as fit make one sequence. Each stream's part is padded to
    `pad_multiple` tokens; padding costs time but is not counted here.
    Defaults: the paper's pretraining (192 spatial tokens per frame, 16 actions per latent frame,
    10K-token sequences, 512 umT5 tokens per sample, K ~ U{1..4}, W ~ U{4..64}).
    """

    token_budget: int = 10240
    video_tokens_per_frame: int = 192
    actions_per_frame: int = 16
    window_frames: int = 64
    text_tokens: int = 512
    chunk_sizes: tuple[int, int] = (1, 4)
    attention_windows: tuple[int, int] = (4, 64)
    forward_dynamics: bool = False
    pad_multiple: int = 128

    @property
    def video_copies(self) -> int:
        return 3 if self.forward_dynamics else 2

    @property
    def tokens_per_frame(self) -> int:
        return self.video_copies * self.video_tokens_per_frame + 2 * self.actions_per_frame

    @property
    def frames_per_window(self) -> int:
        return min(self.window_frames, self.token_budget // self.tokens_per_frame)

    @property
    def windows(self) -> int:
        return self.token_budget // (self.frames_per_window * self.tokens_per_frame)

    @property
    def video_tokens(self) -> int:
        return self.windows * self.frames_per_window * self.video_copies * self.video_tokens_per_frame

    @property
    def action_tokens(self) -> int:
        return self.windows * self.frames_per_window * 2 * self.actions_per_frame

    @property
    def tokens(self) -> int:
        """Real tokens of one sequence (video + action)."""
        return self.video_tokens + self.action_tokens

    def video_stream_tokens(self, config: ModelConfig) -> int:
        """Tokens through the video stream's blocks: the video tokens in the MoT, all of them in
        the shared layout."""
        return self.video_tokens if config.dual_stream else self.tokens

    @property
    def text_tokens_total(self) -> int:
        """Text tokens of one sequence: one text per window."""
        return self.windows * self.text_tokens

    def validate(self) -> None:
        """ValueError naming the field when the mix cannot form a sequence."""
        for name in ("token_budget", "video_tokens_per_frame", "window_frames", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.actions_per_frame < 0:
            raise ValueError(f"actions_per_frame must be >= 0, got {self.actions_per_frame}")
        if self.token_budget < self.tokens_per_frame:
            raise ValueError(
                f"token_budget {self.token_budget} holds no latent frame ({self.tokens_per_frame} tokens each)"
            )
        for name in ("chunk_sizes", "attention_windows"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name == "chunk_sizes" and low < 1):
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")


def _frame_groups(mix: SequenceMix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group per (latent frame, token copy) of a window: frame [G], is_action [G], role [G],
    tokens in the group [G]. Tokens of a group share every input of the mask rule."""
    video_roles = [NOISY, CLEAN] + ([NOISY_FDM] if mix.forward_dynamics else [])
    frame, is_action, role, count = [], [], [], []
    for f in range(mix.frames_per_window):
        for r in video_roles:
            frame.append(f), is_action.append(False), role.append(r), count.append(mix.video_tokens_per_frame)
        for r in (NOISY, CLEAN):
            frame.append(f), is_action.append(True), role.append(r), count.append(mix.actions_per_frame)
    return (torch.tensor(frame), torch.tensor(is_action), torch.tensor(role),
            torch.tensor(count, dtype=torch.float64))


def mean_attended_keys(mix: SequenceMix) -> float:
    """Average number of keys a query attends under the spec 2.3 self-attention mask.

    Evaluates models/masks.py's own rule on (frame, copy) groups of one window, for every chunk
    size K and window W of the per-step draws (each uniform), and averages over queries and draws.
    Windows of a packed sequence never see each other, so one window gives the sequence's mean.
    """
    frame, is_action, role, count = _frame_groups(mix)
    groups = torch.arange(len(count))
    q_idx, k_idx = groups[:, None], groups[None, :]
    total, draws = 0.0, 0
    for chunk in range(mix.chunk_sizes[0], mix.chunk_sizes[1] + 1):
        chunk_id = 2 * torch.div(frame, chunk, rounding_mode="floor") + is_action.long()
        for window in range(mix.attention_windows[0], mix.attention_windows[1] + 1):
            layout = TokenLayout(
                sample_id=torch.zeros(1, len(count), dtype=torch.long), chunk_id=chunk_id[None], role=role[None],
                window=window,
            )
            allowed = self_attention_rule(layout, 0, q_idx, k_idx).double()  # [G, G]
            keys_per_query = allowed @ count
            total += float((keys_per_query * count).sum() / count.sum())
            draws += 1
    return total / draws


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one packed sequence, by part (2 FLOPs per multiply-add)."""

    video_blocks: float  # linear layers of the video stream's blocks (in "shared": of all tokens)
    action_blocks: float  # linear layers of the action stream's blocks (0 in "shared")
    text_keys_values: float  # cross-attention k/v projections of the text tokens
    self_attention: float  # QK^T and PV of the joint self-attention under the mask
    cross_attention: float  # QK^T and PV of the text cross-attention
    embeddings_and_heads: float  # patch/action embedders, timestep embedders + modulation, text projection, heads
    tokens: int

    @property
    def total(self) -> float:
        return (self.video_blocks + self.action_blocks + self.text_keys_values + self.self_attention
                + self.cross_attention + self.embeddings_and_heads)


def forward_flops(config: ModelConfig, mix: SequenceMix, attended_keys: float | None = None) -> ForwardFlops:
    """Forward FLOPs of one packed sequence of `mix` through the model of `config`.

    With d = video width, a = heads x head_dim, f = video FFN, w / g = action width / FFN, L layers,
    Nv / Na video / action tokens, T text tokens of the sequence, t text tokens per sample and
    k = mean_attended_keys(mix):
      video blocks     2 L Nv (4 d a + 2 d a + 2 d f)    q, k, v, out; cross-attention q, out; FFN
      action blocks    2 L Na (4 w a + 2 w g)            q, k, v into the shared head space, out; FFN
      text k, v        2 L T (2 d a)
      self-attention   4 L (Nv + Na) k a                 QK^T and PV over the attended keys
      cross-attention  4 L Nv t a                        each token sees its own sample's text
      embeddings and heads: every Linear outside the blocks, applied per token of its stream
                       (the timestep embedder and its 6-way modulation projection run per token).
    In the "shared" layout every token takes the video path (blocks and cross-attention included).
    """
    c = config
    d, a, f = c.video_width, c.attention_width, c.video_ffn_dim
    keys = mean_attended_keys(mix) if attended_keys is None else attended_keys
    nv, na, text = mix.video_tokens, mix.action_tokens, mix.text_tokens_total
    layers = c.num_layers
    video_path = mix.video_stream_tokens(c)

    def timestep_embedder(width: int) -> int:  # sinusoid -> width -> width, then width -> 6 x width
        return c.freq_dim * width + width * width + width * 6 * width

    video_io = c.video_token_dim * d + timestep_embedder(d) + d * c.video_token_dim
    if c.dual_stream:
        w, g, h = c.action_width, c.action_ffn_dim, c.action_io_hidden
        action_blocks = 2 * layers * na * (4 * w * a + 2 * w * g)
        action_io = c.action_dim * h + h * w + timestep_embedder(w) + w * h + h * c.action_dim
    else:
        action_blocks = 0
        action_io = c.action_dim * d + timestep_embedder(d) + d * c.action_dim
    text_projection = c.text_dim * d + d * d
    return ForwardFlops(
        video_blocks=2.0 * layers * video_path * (4 * d * a + 2 * d * a + 2 * d * f),
        action_blocks=float(action_blocks),
        text_keys_values=2.0 * layers * text * 2 * d * a,
        self_attention=4.0 * layers * (nv + na) * keys * a,
        cross_attention=4.0 * layers * video_path * mix.text_tokens * a,
        embeddings_and_heads=2.0 * (nv * video_io + na * action_io + text * text_projection),
        tokens=mix.tokens,
    )


def training_flops_per_token(config: ModelConfig, mix: SequenceMix, attended_keys: float | None = None) -> float:
    """Model FLOPs of forward + backward per real token: 3 x forward (the backward pass computes
    gradients for both the inputs and the weights of every matmul, twice the forward's work).
    The optimizer step's elementwise work is not counted, as in the usual MFU convention."""
    flops = forward_flops(config, mix, attended_keys)
    return 3.0 * flops.total / flops.tokens
