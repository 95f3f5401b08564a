"""One transformer block of either stream (Wan2.2 block shape), split around its self-attention.

The split lets a layer of the MoT run the video block and the action block up to their q/k/v,
attend once over the joint sequence, and finish each block separately. Each depth is one call of a
block (`forward` in the shared layout, the video block's `joint_forward` in the MoT), so whatever
wraps a depth from outside (FSDP's unshard, activation checkpointing, compile) hooks one method.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionKernel, AttentionKernels, CrossAttention, SelfAttention
from .layers import FeedForward, FP32LayerNorm


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

    def forward(self, x: torch.Tensor, timestep_proj: torch.Tensor, rope, text: torch.Tensor, kernels: AttentionKernels):
        """One depth of the shared layout: x [B, L, W] is the whole joint sequence."""
        mod = self.modulation(timestep_proj)
        q, k, v = self.attention_inputs(x, mod, rope)
        return self.finish(x, kernels.self_attention(q, k, v), mod, text, kernels.cross_attention)

    def joint_forward(
        self,
        action_block: TransformerBlock,
        x_video: torch.Tensor,
        x_action: torch.Tensor,
        proj_video: torch.Tensor,
        proj_action: torch.Tensor,
        rope_video,
        rope_action,
        text: torch.Tensor,
        kernels: AttentionKernels,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoT depth, entered through its video block: per-stream q/k/v, one joint softmax over
        [video; action], per-stream finish. -> (x_video, x_action)"""
        mod_video = self.modulation(proj_video)
        mod_action = action_block.modulation(proj_action)
        qv, kv, vv = self.attention_inputs(x_video, mod_video, rope_video)
        qa, ka, va = action_block.attention_inputs(x_action, mod_action, rope_action)
        attended = kernels.self_attention(torch.cat([qv, qa], 1), torch.cat([kv, ka], 1), torch.cat([vv, va], 1))
        num_video = x_video.shape[1]
        x_video = self.finish(x_video, attended[:, :num_video], mod_video, text, kernels.cross_attention)
        x_action = action_block.finish(x_action, attended[:, num_video:], mod_action, None, kernels.cross_attention)
        return x_video, x_action
