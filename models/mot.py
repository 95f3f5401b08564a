"""The LingBot-VA model: a video stream and an action stream over one causal token sequence.

Layout "mot" (the paper): per layer a 3072-wide video block and a 768-wide action block, each with
its own norms, modulation, q/k/v and FFN; their q/k/v live in the same 24 x 128 head space and are
attended jointly, then each stream projects back to its own width. Only the video stream reads the
text (cross-attention); the action stream sees it through joint attention.

Layout "shared" (the released checkpoint): the action tokens run through the same blocks as the
video tokens; only the embedders, timestep embedders and output heads are per modality.

The forward reads in three pieces: `embed` (tokens -> the first depth's DepthState), `run_depths`
(each depth in turn), `heads` (the last state -> predictions). A pipeline stage
(parallelism/pipeline.py) holds some of the parts under the same names and runs the same pieces.
Which layout the streams follow is decided here, from `ModelConfig.dual_stream`: the parts
`__init__` builds, the streams `embed` lays out and `heads` reads back, the depths `depths` lists.

The model knows nothing of meshes or masks: the caller passes attention kernels (models/attention.py)
built for the step's token layout, with video tokens first and action tokens after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .attention import AttentionKernels
from .blocks import Depth, DepthState, TransformerBlock
from .config import ModelConfig
from .layers import ActionMLP, ConditionEmbedder, FP32LayerNorm
from .patching import input_to_output_order
from .rope import RotaryEmbedding3D, rope_axis_dims

# The parts outside the depths, by name: what the first pipeline stage holds, and the last.
EMBEDDING_PARTS = ("patch_embedding_mlp", "action_embedder", "condition_embedder", "condition_embedder_action")
HEAD_PARTS = ("proj_out", "action_proj_out", "scale_shift_table", "action_scale_shift_table", "head", "action_head")


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


class TimestepEmbeddings(NamedTuple):
    """The output heads' modulation input per modality (no depth reads it)."""

    video: torch.Tensor  # [B, Lv, video width]
    action: torch.Tensor  # [B, La, action width]


class StreamTime(NamedTuple):
    """One modality's timestep conditioning, as its ConditionEmbedder computes it: temb [B, L, W]
    and timestep_proj [B, L, 6, W], float32. A caller that computed them beforehand (inference, once
    per noise level) may give L = 1 for tokens that share one timestep: the MoT's per-stream
    modulation broadcasts it over the stream, bit for bit what L copies give."""

    temb: torch.Tensor
    proj: torch.Tensor

    def expand(self, batch: int, length: int) -> StreamTime:
        return StreamTime(self.temb.expand(batch, length, -1), self.proj.expand(batch, length, -1, -1))


class ModelPieces(nn.Module):
    """The forward of LingBot-VA over parts held under the model's names: LingBotVA holds them all,
    a pipeline stage the rope, a contiguous range of depths and, first / last, the embedders /
    heads. `config` says which layout the parts follow."""

    config: ModelConfig

    def embed(self, inputs: ModelInputs, time: tuple[StreamTime, StreamTime] | None = None
              ) -> tuple[DepthState, TimestepEmbeddings]:
        """Token inputs -> the state the first depth reads, and what the heads modulate with.
        time: the (video, action) timestep conditioning of these inputs' timesteps, computed by
        the caller (see StreamTime); None computes it here."""
        x_video = self.patch_embedding_mlp(inputs.video_tokens)
        x_action = self.action_embedder(inputs.action_tokens)
        if time is None:
            video = StreamTime(*self.condition_embedder(inputs.video_timesteps))
            action = StreamTime(*self.condition_embedder_action(inputs.action_timesteps))
        else:
            video, action = time
            if not self.config.dual_stream:  # one joint stream: every token needs its own row
                video = video.expand(*inputs.video_timesteps.shape)
                action = action.expand(*inputs.action_timesteps.shape)
        state = DepthState(
            streams=self.streams_of(x_video, x_action),
            timestep_proj=self.streams_of(video.proj, action.proj),
            rope=self.stream_rope(inputs.video_positions, inputs.action_positions),
            text=self.condition_embedder.text_embedder(inputs.text),
        )
        return state, TimestepEmbeddings(video.temb, action.temb)

    def streams_of(self, video, action) -> tuple:
        """Per-modality values (tensors [B, Lv, ...] and [B, La, ...], or tuples of them) -> per
        stream: (video, action) in the MoT, one joint [video; action] in the shared layout."""
        if self.config.dual_stream:
            return video, action
        return (tree_map(lambda v, a: torch.cat([v, a], dim=1), video, action),)

    def stream_rope(self, video_positions: torch.Tensor, action_positions: torch.Tensor) -> tuple:
        """Positions [B, Lv, 3] and [B, La, 3] -> the (cos, sin) tables of each stream."""
        return self.streams_of(self.rope(video_positions), self.rope(action_positions))

    def block_stacks(self) -> dict[str, nn.ModuleList]:
        """The per-depth block lists held here, by name: "blocks" (the video stream's, or the
        shared ones) and, in the MoT, "action_blocks"."""
        if self.config.dual_stream:
            return {"blocks": self.blocks, "action_blocks": self.action_blocks}
        return {"blocks": self.blocks}

    def depths(self) -> list[Depth]:
        """The depths held here, in execution order (indices count from the first held): the video
        block and the action block of a layer in the MoT, entered through the video block's
        joint_forward; one shared block in the shared layout."""
        method = "joint_forward" if self.config.dual_stream else "forward"
        return [Depth(i, blocks, method) for i, blocks in enumerate(zip(*self.block_stacks().values()))]

    def run_depths(self, state: DepthState, kernels: AttentionKernels) -> DepthState:
        for depth in self.depths():
            state = state.with_streams(depth(state, kernels))
        return state

    def heads(self, state: DepthState, temb: TimestepEmbeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """The last depth's state -> (video prediction [B, Lv, pt*ph*pw*C] patch-major, action
        prediction [B, La, action_dim])."""
        if self.config.dual_stream:
            (x_video, x_action), action_table = state.streams, self.action_scale_shift_table
        else:
            (x,), action_table = state.streams, self.scale_shift_table  # one table for both heads
            num_video = temb.video.shape[1]
            x_video, x_action = x[:, :num_video], x[:, num_video:]
        video_out = self.head(x_video, temb.video, self.scale_shift_table, self.proj_out)
        return video_out, self.action_head(x_action, temb.action, action_table, self.action_proj_out)


class LingBotVA(ModelPieces):
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

        if config.dual_stream:
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
        self.action_head = OutputHead(d_action, config.eps) if config.dual_stream else self.head
        self.rope = RotaryEmbedding3D(config.head_dim, config.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The from-scratch initialisation (a run that imports Wan2.2 or a released checkpoint
        overwrites it): as Wan's transformer, Xavier-uniform linear layers with zero bias and
        N(0, 0.02) text and timestep embedders; and a video head that passes the noisy input
        through.

        The velocity target noise - x0 holds the input's own noise, which the model has to hand
        back through a head of width x token-dim weights. Learnt from nothing that took longer
        than the demo trains: under PyTorch's default initialisation the demo model passed a
        quarter of the noise through after 250 steps (8% with Wan's zero head), so at high noise
        its clean-latent estimate was worse than the channel mean; trained at pure noise alone it
        learnt none of it in 60 steps at any learning rate. Starting from the pass-through it
        reaches the channel mean within 30 steps (docs/benchmarks.md, the video objective).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        embedders = [self.condition_embedder.time_embedder, self.condition_embedder_action.time_embedder]
        embedders += [e.text_embedder for e in (self.condition_embedder, self.condition_embedder_action)
                      if e.text_embedder is not None]
        for embedder in embedders:
            for module in embedder.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        # The video head starts as the inverse of the patch embedding (in the head's feature order),
        # scaled by the embedded token's spread that the output norm divides out: at pure noise the
        # model then predicts its input, which is the velocity noise - x0 up to the data.
        # An orthogonal patch embedding (Xavier's scale) keeps that inverse well conditioned at
        # any width; a random one as wide as the token has near-zero singular values to invert.
        fan_out, fan_in = self.patch_embedding_mlp.weight.shape
        nn.init.orthogonal_(self.patch_embedding_mlp.weight, gain=(2.0 * max(fan_out, fan_in) / (fan_in + fan_out)) ** 0.5)
        embed = self.patch_embedding_mlp.weight.double()  # [width, token]
        gain = embed.pow(2).sum(1).mean().sqrt()  # std of an embedded unit-variance token
        head_order = input_to_output_order(torch.arange(embed.shape[1])[None], self.config.patch_size)[0]
        self.proj_out.weight.copy_(gain * torch.linalg.pinv(embed)[head_order].float())
        for block in self.blocks:
            init_position_heads(block.attn1, self.config.head_dim)

    def _block(self, width: int, ffn_dim: int, text: bool) -> TransformerBlock:
        c = self.config
        return TransformerBlock(width, ffn_dim, c.num_heads, c.head_dim, c.eps, text_cross_attention=text)

    def forward(self, inputs: ModelInputs, kernels: AttentionKernels,
                time: tuple[StreamTime, StreamTime] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (video prediction [B, Lv, pt*ph*pw*C] patch-major, action prediction [B, La, action_dim]).
        time: see embed."""
        state, temb = self.embed(inputs, time)
        return self.heads(self.run_depths(state, kernels), temb)


POSITION_BIAS = 3.0  # the constant query/key component of a position head (content is ~1 per channel)
POSITION_PAIRS = 2  # rotary pairs per spatial axis that carry it: the fastest-turning, which tell rows apart


@torch.no_grad()
def init_position_heads(attention: nn.Module, head_dim: int) -> None:
    """Start the first half of a self-attention's heads attending by position: their query and key
    biases get a constant on the fastest rotary pairs of the row and column axes, so RoPE turns
    q.k into a sum of cos(omega * row offset) + cos(omega * col offset), largest where a key sits at
    the query's own (row, col), in any frame: where a scene that persists is found. The frame axis
    and the weights stay as initialised, so content and recency are learnt on top.

    The demo model learnt from nothing without it attended by content first: it knew a block was
    somewhere ahead and mixed the colours of distinct blocks, and lost to copying the last frame
    (docs/benchmarks.md, the demo's video one chunk ahead). A run that imports Wan2.2 or a
    released checkpoint overwrites this with weights that already attend where they need to."""
    frame, row, _ = rope_axis_dims(head_dim)
    heads = max(1, attention.num_heads // 2)
    for head in range(heads):
        for axis_start in (frame, frame + row):
            for pair in range(min(POSITION_PAIRS, row // 2)):
                channel = head * head_dim + axis_start + 2 * pair
                attention.to_q.bias[channel] = POSITION_BIAS
                attention.to_k.bias[channel] = POSITION_BIAS
