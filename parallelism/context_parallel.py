"""Ulysses context parallelism over the joint video-action sequence (DeepSpeed-Ulysses).

Both parts of the sequence are sharded over the cp group: rank r holds the r-th contiguous shard of
the video tokens and the r-th contiguous shard of the action tokens, so its local sequence is
[video_r; action_r] and the model runs on it unchanged. Tokens meet only in self-attention, where
DeepSpeed's `DistributedAttention` trades the sequence shard for a head shard with an all-to-all:
each rank attends the whole sequence for H / cp heads, so any mask works. The gathered sequence is
the concatenation of the local ones, [video_0; action_0; video_1; action_1; ...]; its mask is the
step's mask with rows and columns permuted into that order (`gathered_layout`). Cross-attention
needs no communication: local queries attend the full text, which every rank holds. Under tensor
parallelism the kernels see the rank's H / tp heads, which Ulysses splits further (H divides by
tp x cp).

The per-frame losses divide a frame's squared-error sum by its element count, and a frame's tokens
may lie on several ranks, so sums and counts are all-reduced over cp before the division. The
all-reduce is differentiable and its backward sums the (identical) gradients of the cp ranks, so
every rank's parameter gradient is cp times its local contribution; FSDP's mean over the
"dp_shard_cp" mesh dim turns that into the exact sum over cp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from lbva.models.attention import AttentionKernel, AttentionKernels, Backend, build_kernels
from lbva.models.masks import TokenLayout

from .mesh import ParallelMesh
from .step_layout import FrameReduce, StepLayout


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its cp group."""

    group: dist.ProcessGroup
    rank: int
    size: int

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh) -> ContextParallel:
        """The "cp" dim of the world mesh; also readies DeepSpeed's communication layer, which
        DistributedAttention's all-to-all goes through."""
        import deepspeed

        # Idempotent once torch.distributed is up; the first call in a process JIT-builds (or
        # loads from the torch extensions cache) DeepSpeed's CPU shared-memory comm op.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        cp_mesh = mesh["cp"]
        return cls(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size())

    def shard(self, length: int) -> slice:
        """This rank's contiguous part of a sequence part of `length` tokens."""
        if length % self.size:
            raise ValueError(
                f"a sequence part of {length} tokens does not split over cp = {self.size} ranks; "
                "data.pad_multiple must be a multiple of tp x cp"
            )
        size = length // self.size
        return slice(self.rank * size, (self.rank + 1) * size)


def gathered_order(num_video: int, num_action: int, cp_size: int) -> torch.Tensor:
    """[Lv + La]: for each position of the all-to-all-gathered sequence [video_0; action_0;
    video_1; action_1; ...], its index in the model's order [video; action]."""
    video = torch.arange(num_video).view(cp_size, -1)
    action = torch.arange(num_video, num_video + num_action).view(cp_size, -1)
    return torch.cat([video, action], dim=1).flatten()


def permute_layout(layout: TokenLayout, order: torch.Tensor) -> TokenLayout:
    """The layout of the tokens taken in `order` ([L] indices into the layout's tokens)."""
    order = order.to(layout.sample_id.device)
    return TokenLayout(
        sample_id=layout.sample_id[:, order],
        chunk_id=layout.chunk_id[:, order],
        role=layout.role[:, order],
        window=layout.window,
    )


def gathered_layout(layout: TokenLayout, num_video: int, cp_size: int) -> TokenLayout:
    """The layout of the sequence the ranks attend after the all-to-all."""
    return permute_layout(layout, gathered_order(num_video, layout.length - num_video, cp_size))


def local_tokens(tensor: torch.Tensor, num_video: int, cp: ContextParallel) -> torch.Tensor:
    """[B, Lv + La, ...] in the model's order -> this rank's [video_r; action_r], [B, (Lv + La) / cp, ...]."""
    video, action = tensor[:, :num_video], tensor[:, num_video:]
    return torch.cat([video[:, cp.shard(video.shape[1])], action[:, cp.shard(action.shape[1])]], dim=1)


def ulysses_attention(local_attention: AttentionKernel, cp: ContextParallel) -> AttentionKernel:
    """Self-attention over the whole cp-sharded sequence: q, k, v [B, L / cp, H, D] -> all-to-all
    -> local_attention on [B, L, H / cp, D] -> all-to-all back -> [B, L / cp, H, D]."""
    from deepspeed.sequence.layer import DistributedAttention

    # scatter the heads (dim 2), gather the sequence (dim 1) of [B, L, H, D] tensors
    distributed = DistributedAttention(local_attention, cp.group, scatter_idx=2, gather_idx=1)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] % cp.size:
            # DeepSpeed would take its uneven-heads path, which needs its own process groups.
            raise ValueError(f"{q.shape[2]} attention heads on this rank do not split over cp = {cp.size} ranks")
        return distributed(q, k, v, 0)

    return attend


def ulysses_kernels(
    layout: TokenLayout, text_sample: torch.Tensor, num_video: int, cp: ContextParallel, backend: Backend
) -> AttentionKernels:
    """The step's kernels for a model that runs on this rank's [video_r; action_r] tokens.

    layout: the full sequence's metadata [B, Lv + La] in the model's order (every rank has it);
    text_sample: [B, T] sample id of each text token.
    """
    local_sample = local_tokens(layout.sample_id, num_video, cp)
    full = build_kernels(gathered_layout(layout, num_video, cp.size), local_sample, text_sample, backend)
    return AttentionKernels(ulysses_attention(full.self_attention, cp), full.cross_attention)


def frame_reduce(cp: ContextParallel) -> FrameReduce:
    """Sum per-frame sums and counts over the cp group (functional all-reduce: differentiable, its
    backward all-reduces the gradients)."""

    def reduce(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return funcol.all_reduce(sums, "sum", cp.group), funcol.all_reduce(counts, "sum", cp.group)

    return reduce


def context_parallel_layout(cp: ContextParallel, backend: Backend) -> StepLayout:
    """The step's hooks on a cp rank: Ulysses kernels, this rank's token shards, per-frame loss
    sums completed over the cp group. Every cp rank gets the single-process loss terms."""

    def kernels(layout: TokenLayout, text_sample: torch.Tensor, num_video: int) -> AttentionKernels:
        return ulysses_kernels(layout, text_sample, num_video, cp, backend)

    return StepLayout(kernels, reduce_frames=frame_reduce(cp), token_shard=cp.shard)
