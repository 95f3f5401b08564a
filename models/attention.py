"""Attention projections (released names) and the attention kernels they are given.

The model never decides which kernel runs or which mask applies: it receives two callables,
`self_attention(q, k, v)` and `cross_attention(q, k, v)`, built here from the step's masks. This is
the single switch point for kernels, and the seam where context parallelism wraps attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Callable, Literal

import torch
from torch import nn
from torch.nn import functional as F

from .masks import (
    TokenLayout,
    dense_cross_attention_mask,
    dense_self_attention_mask,
    flex_cross_attention_mask,
    flex_self_attention_mask,
)
from .rope import apply_rotary

# q, k, v: [B, L, H, D] -> out [B, Lq, H, D]
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Backend = Literal["auto", "flex", "sdpa"]


class SelfAttention(nn.Module):
    """q/k/v from a stream of width `width` into the shared head space; output back to `width`."""

    def __init__(self, width: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(width, inner)
        self.to_k = nn.Linear(width, inner)
        self.to_v = nn.Linear(width, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, width), nn.Dropout(0.0)])
        # RMSNorm across all heads (the full inner width), as Wan2.2 does.
        self.norm_q = nn.RMSNorm(inner, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(inner, eps=eps, elementwise_affine=True)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x [B, L, width] -> q, k, v [B, L, H, D], with q/k normalised and rotated."""
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.to_k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(x).unflatten(-1, (self.num_heads, -1))
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """[B, L, H, D] -> [B, L, width]"""
        return self.to_out[1](self.to_out[0](attended.flatten(-2)))


class CrossAttention(SelfAttention):
    """Text cross-attention: queries from the stream, keys/values from the projected text, no RoPE."""

    def forward(self, x: torch.Tensor, text: torch.Tensor, kernel: AttentionKernel) -> torch.Tensor:
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.to_k(text)).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(text).unflatten(-1, (self.num_heads, -1))
        return self.output(kernel(q, k, v))


def sdpa_kernel(mask: torch.Tensor | None) -> AttentionKernel:
    """Scaled-dot-product attention with a dense boolean mask [B, 1, Lq, Lk] (or none)."""

    def attend(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    return attend


def prefix_sdpa_kernel(mask: torch.Tensor) -> AttentionKernel:
    """SDPA whose Lq queries are the first Lq rows of `mask` [B, 1, L, Lk]: the mask is cut to the
    query's length when the kernel runs, so one mask (data, not a length-keyed cache) serves any
    query prefix and a compiled caller sees only tensor shapes."""

    def attend(q, k, v):
        return sdpa_kernel(mask[:, :, : q.shape[1]])(q, k, v)

    return attend


@cache
def _compiled_flex_attention():
    """One compiled flex_attention per process: a new torch.compile wrapper per step would be a new
    object for the depths' compiled graphs to guard on."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_kernel(block_mask, compiled: bool, prefix: bool = False) -> AttentionKernel:
    """FlexAttention over `block_mask`. prefix: the Lq queries are the first Lq rows of the mask
    (the cross-attention of the MoT's video tokens), cropped when the kernel runs.

    q and k are cast to v's dtype: RoPE leaves them in float32 under bf16 autocast, and the
    compiled kernel needs one dtype for all three."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex_attention() if compiled else flex_attention

    def attend(q, k, v):
        mask = block_mask._adjust(q.shape[1], k.shape[1]) if prefix else block_mask
        q, k = q.to(v.dtype), k.to(v.dtype)
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask).transpose(1, 2)

    return attend


def resolve_backend(backend: Backend, device: torch.device) -> Literal["flex", "sdpa"]:
    """auto: compiled FlexAttention on CUDA; SDPA with a dense mask on CPU, where FlexAttention has
    no backward pass (torch 2.13 raises NotImplementedError)."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


@dataclass
class AttentionKernels:
    self_attention: AttentionKernel
    cross_attention: AttentionKernel


def build_kernels(
    layout: TokenLayout, token_sample: torch.Tensor, text_sample: torch.Tensor, backend: Backend
) -> AttentionKernels:
    """Kernels for one step: the self-attention mask from the layout, the cross-attention mask from
    the sample ids of the tokens [B, L] (video first) and of the text tokens [B, T].

    Every mask is built here, before the model runs, so a compiled depth receives masks as data.
    Cross-attention queries are a prefix of the tokens (all of them in the shared layout, the video
    tokens in the MoT): its mask covers all L tokens and the kernel cuts it to the query length."""
    chosen = resolve_backend(backend, layout.sample_id.device)
    if chosen == "flex":
        on_cuda = layout.sample_id.device.type == "cuda"
        return AttentionKernels(
            flex_kernel(flex_self_attention_mask(layout, compile_mask=on_cuda), compiled=on_cuda),
            flex_kernel(flex_cross_attention_mask(token_sample, text_sample, on_cuda), compiled=on_cuda, prefix=True),
        )
    return AttentionKernels(
        sdpa_kernel(dense_self_attention_mask(layout)),
        prefix_sdpa_kernel(dense_cross_attention_mask(token_sample, text_sample)),
    )
