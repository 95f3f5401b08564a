"""One transformer block of either stream (Wan2.2 block shape), split around its self-attention,
and the depths the model is made of.

The split lets a layer of the MoT run the video block and the action block up to their q/k/v,
attend once over the joint sequence, and finish each block separately. Each depth is one call of a
block taking the depth state and the attention kernels (`forward` in the shared layout, the video
block's `joint_forward` in the MoT), so whatever wraps a depth from outside (tensor parallelism's
sequence sharding, FSDP's unshard, activation checkpointing, compile) hooks one method and reads
the depth's inputs by name from its DepthState.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils._pytree import register_dataclass

from .attention import AttentionKernel, AttentionKernels, CrossAttention, SelfAttention
from .layers import FeedForward, FP32LayerNorm

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, L, 1, head_dim / 2]


@dataclass
class DepthState:
    """What a depth reads, and what passes from one depth (or pipeline stage) to the next.

    Per residual stream, as models/mot.py lays them out: (video, action) in the MoT, one joint
    [video; action] stream in the shared layout. A depth returns new `streams`; everything else is
    the same for every depth. Nothing a depth does not read is here: whatever wraps a depth sees
    exactly its inputs.
    """

    streams: tuple[torch.Tensor, ...]  # [B, L_s, W_s]
    timestep_proj: tuple[torch.Tensor, ...]  # [B, L_s, 6, W_s]: what each block's modulation reads
    rope: tuple[Rope, ...]
    text: torch.Tensor  # [B, T, video width]: the projected text, read by video blocks only

    def with_streams(self, streams: tuple[torch.Tensor, ...]) -> DepthState:
        return replace(self, streams=tuple(streams))


# FSDP finds the input tensors of a depth's call, to reduce-scatter its gradients as soon as the
# depth's backward ends; older torch releases (the project allows >= 2.9) look for them with pytree's
# tree_flatten, which sees into a dataclass only once it is registered.
register_dataclass(DepthState)


@dataclass(frozen=True)
class Depth:
    """One depth: `blocks` hold its parameters (the entry block first) and one call of the entry's
    `method` with (state, kernels, *the other blocks) runs it, returning the new streams.

    method "forward" is called through the module, so module hooks (FSDP) run around it.
    """

    index: int
    blocks: tuple[TransformerBlock, ...]
    method: str

    @property
    def entry(self) -> TransformerBlock:
        return self.blocks[0]

    def __call__(self, state: DepthState, kernels: AttentionKernels) -> tuple[torch.Tensor, ...]:
        run = self.entry if self.method == "forward" else getattr(self.entry, self.method)
        return run(state, kernels, *self.blocks[1:])

    def wrap(self, wrapper: Callable[[Callable], Callable]) -> None:
        """Replace the entry method, on this instance, by wrapper(current entry method): parameter
        names do not change."""
        setattr(self.entry, self.method, wrapper(getattr(self.entry, self.method)))


class TransformerBlock(nn.Module):
    """adaLN-modulated block: self-attention (shared head space), optional text cross-attention, FFN.

    width: the stream's residual width (3072 video, 768 action at full size);
    q/k/v always project into num_heads x head_dim so streams can attend jointly.
    """

    def __init__(
        self, width: int, ffn_dim: int, num_heads: int, head_dim: int, eps: float, text_cross_attention: bool
    ):
        super().__init__()
        self.norm1 = FP32LayerNorm(width, eps, elementwise_affine=False)
        self.attn1 = SelfAttention(width, num_heads, head_dim, eps)
        if text_cross_attention:
            self.norm2 = FP32LayerNorm(width, eps, elementwise_affine=True)
            self.attn2 = CrossAttention(width, num_heads, head_dim, eps)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = FP32LayerNorm(width, eps, elementwise_affine=False)
        self.ffn = FeedForward(width, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, width) / width**0.5)

    def modulation(self, timestep_proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """timestep_proj [B, L, 6, W] -> shift1, scale1, gate1, shift2, scale2, gate2, each [B, L, W] fp32."""
        return (self.scale_shift_table.float() + timestep_proj.float()).unbind(dim=2)

    def attention_inputs(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], rope):
        shift1, scale1 = mod[0], mod[1]
        h = (self.norm1(x) * (1 + scale1) + shift1).type_as(x)
        return self.attn1.project(h, rope)

    def finish(
        self,
        x: torch.Tensor,
        attended: torch.Tensor,
        mod: tuple[torch.Tensor, ...],
        text: torch.Tensor | None,
        cross_attention: AttentionKernel,
    ) -> torch.Tensor:
        """Residual of the attended values [B, L, H, D], then cross-attention and FFN."""
        _, _, gate1, shift2, scale2, gate2 = mod
        x = (x.float() + self.attn1.output(attended).float() * gate1).type_as(x)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x).type_as(x), text, cross_attention)
        h = (self.norm3(x) * (1 + scale2) + shift2).type_as(x)
        return (x.float() + self.ffn(h).float() * gate2).type_as(x)

    def forward(self, state: DepthState, kernels: AttentionKernels) -> tuple[torch.Tensor]:
        """One depth of the shared layout: the state's one stream [B, L, W] is the whole joint
        sequence. -> (x,)"""
        (x,), (timestep_proj,), (rope,) = state.streams, state.timestep_proj, state.rope
        mod = self.modulation(timestep_proj)
        q, k, v = self.attention_inputs(x, mod, rope)
        return (self.finish(x, kernels.self_attention(q, k, v), mod, state.text, kernels.cross_attention),)

    def joint_forward(
        self, state: DepthState, kernels: AttentionKernels, action_block: TransformerBlock
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoT depth, entered through its video block: per-stream q/k/v, one joint softmax over
        [video; action], per-stream finish. -> (x_video, x_action)"""
        (x_video, x_action), (proj_video, proj_action) = state.streams, state.timestep_proj
        rope_video, rope_action = state.rope
        mod_video = self.modulation(proj_video)
        mod_action = action_block.modulation(proj_action)
        qv, kv, vv = self.attention_inputs(x_video, mod_video, rope_video)
        qa, ka, va = action_block.attention_inputs(x_action, mod_action, rope_action)
        attended = kernels.self_attention(torch.cat([qv, qa], 1), torch.cat([kv, ka], 1), torch.cat([vv, va], 1))
        num_video = x_video.shape[1]
        x_video = self.finish(x_video, attended[:, :num_video], mod_video, state.text, kernels.cross_attention)
        x_action = action_block.finish(x_action, attended[:, num_video:], mod_action, None, kernels.cross_attention)
        return x_video, x_action
