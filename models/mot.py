"""The LingBot-VA model: a video stream and an action stream over one causal token sequence.

Layout "mot" (the paper): per layer a 3072-wide video block and a 768-wide action block, each with
its own norms, modulation, q/k/v and FFN; their q/k/v live in the same 24 x 128 head space and are
attended jointly, then each stream projects back to its own width. Only the video stream reads the
text (cross-attention); the action stream sees it through joint attention.

Layout "shared" (the released checkpoint): the action tokens run through the same blocks as the
video tokens; only the embedders, timestep embedders and output heads are per modality.

The model knows nothing of meshes or masks: the caller passes attention kernels (models/attention.py)
built for the step's token layout, with video tokens first and action tokens after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionKernels
from .blocks import TransformerBlock
from .config import ModelConfig
from .layers import ActionMLP, ConditionEmbedder, FP32LayerNorm
from .rope import RotaryEmbedding3D


@dataclass
class ModelInputs:
    """One packed batch in token space. Timesteps are sigma * 1000 per token (1000 = pure noise)."""

    video_tokens: torch.Tensor  # [B, Lv, C*pt*ph*pw], channel-major patches
    video_timesteps: torch.Tensor  # [B, Lv]
    video_positions: torch.Tensor  # [B, Lv, 3] (frame, row, col)
    action_tokens: torch.Tensor  # [B, La, action_dim]
    action_timesteps: torch.Tensor  # [B, La]
    action_positions: torch.Tensor  # [B, La, 3] (fractional frame, -1, -1)
    text: torch.Tensor  # [B, T, text_dim] text-encoder features


class OutputHead(nn.Module):
    """Final FP32 LayerNorm modulated by (table + temb), then the stream's projection."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.norm_out = FP32LayerNorm(width, eps, elementwise_affine=False)

    def forward(self, x, temb, table, proj):
        shift, scale = (table.float() + temb.unsqueeze(2)).unbind(dim=2)
        return proj((self.norm_out(x) * (1 + scale) + shift).type_as(x))


class LingBotVA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        d_video = config.video_width
        d_action = config.stream_width

        # Video stream (parameter names as in diffusers' WanTransformer3DModel / the release).
        self.patch_embedding_mlp = nn.Linear(config.video_token_dim, d_video)
        self.condition_embedder = ConditionEmbedder(d_video, config.freq_dim, config.text_dim)
        self.blocks = nn.ModuleList([self._block(d_video, config.video_ffn_dim, True) for _ in range(config.num_layers)])
        self.proj_out = nn.Linear(d_video, config.video_token_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d_video) / d_video**0.5)

        if config.layout == "mot":
            self.action_embedder = ActionMLP(config.action_dim, config.action_io_hidden, d_action)
            self.condition_embedder_action = ConditionEmbedder(d_action, config.freq_dim, text_dim=None)
            self.action_blocks = nn.ModuleList(
                [self._block(d_action, config.action_ffn_dim, False) for _ in range(config.num_layers)]
            )
            self.action_proj_out = ActionMLP(d_action, config.action_io_hidden, config.action_dim)
            self.action_scale_shift_table = nn.Parameter(torch.randn(1, 2, d_action) / d_action**0.5)
        else:
            self.action_embedder = nn.Linear(config.action_dim, d_video)
            # The release deep-copies the whole embedder, text projection included (unused).
            self.condition_embedder_action = ConditionEmbedder(d_video, config.freq_dim, config.text_dim)
            self.action_blocks = None
            self.action_proj_out = nn.Linear(d_video, config.action_dim)
            self.action_scale_shift_table = None

        self.head = OutputHead(d_video, config.eps)
        self.action_head = OutputHead(d_action, config.eps) if config.layout == "mot" else self.head
        self.rope = RotaryEmbedding3D(config.head_dim, config.rope_theta)

    def _block(self, width: int, ffn_dim: int, text: bool) -> TransformerBlock:
        c = self.config
        return TransformerBlock(width, ffn_dim, c.num_heads, c.head_dim, c.eps, text_cross_attention=text)

    def forward(self, inputs: ModelInputs, kernels: AttentionKernels) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (video prediction [B, Lv, pt*ph*pw*C] patch-major, action prediction [B, La, action_dim])."""
        x_video = self.patch_embedding_mlp(inputs.video_tokens)
        x_action = self.action_embedder(inputs.action_tokens)
        temb_video, proj_video = self.condition_embedder(inputs.video_timesteps)
        temb_action, proj_action = self.condition_embedder_action(inputs.action_timesteps)
        text = self.condition_embedder.text_embedder(inputs.text)
        rope_video = self.rope(inputs.video_positions)
        rope_action = self.rope(inputs.action_positions)
        x_video, x_action = run_depths(
            self.blocks, self.action_blocks, x_video, x_action, proj_video, proj_action, rope_video, rope_action,
            text, kernels,
        )

        video_out = self.head(x_video, temb_video, self.scale_shift_table, self.proj_out)
        action_table = self.scale_shift_table if self.action_scale_shift_table is None else self.action_scale_shift_table
        action_out = self.action_head(x_action, temb_action, action_table, self.action_proj_out)
        return video_out, action_out


def run_depths(blocks, action_blocks, x_video, x_action, proj_video, proj_action, rope_video, rope_action, text,
               kernels: AttentionKernels) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a contiguous range of depths (all of them, or a pipeline stage's). action_blocks None:
    the shared backbone, one joint sequence through the same blocks; else one MoT depth per pair."""
    if action_blocks is None:
        num_video = x_video.shape[1]
        x = torch.cat([x_video, x_action], dim=1)
        proj = torch.cat([proj_video, proj_action], dim=1)
        rope = tuple(torch.cat(pair, dim=1) for pair in zip(rope_video, rope_action))
        for block in blocks:
            x = block(x, proj, rope, text, kernels)
        return x[:, :num_video], x[:, num_video:]
    for video_block, action_block in zip(blocks, action_blocks):
        x_video, x_action = video_block.joint_forward(
            action_block, x_video, x_action, proj_video, proj_action, rope_video, rope_action, text, kernels
        )
    return x_video, x_action
