"""Tensor + sequence parallelism over the "tp" mesh dim, applied to a built LingBotVA from outside.

Inside each depth (the sequence-parallel region) activations are DTensors:
- the residual streams and the per-token modulation are sequence-sharded, Shard(1), so norms,
  modulation, gates and residual adds run on 1/tp of the tokens;
- q/k/v, the FFN's first linear and the cross-attention's q/k/v (k/v from the text) are
  column-parallel: their input is all-gathered over the sequence and their output is sharded by
  heads (FFN: by hidden unit). The action stream's q/k/v (768 -> 3072) are column-parallel into the
  same head shards as the video's, so the joint attention concatenates matching heads;
- the attention outputs and the FFN's second linear are row-parallel, reduce-scattered back to
  Shard(1);
- norm_q / norm_k, the RMSNorm over all heads, become HeadShardedRMSNorm: the sum of squares of
  the local heads is all-reduced over tp (a [B, L, 1] tensor) instead of all-gathering q and k;
- the attention kernels (and Ulysses around them) see plain local tensors [B, L, H / tp, D].
Between depths each stream is a plain local sequence shard; the first depth takes its shard of the
full stream, the last all-gathers it.

Outside the depths (embedders, output heads, ~2% of the FLOPs) every tp rank computes the whole
sequence with Replicate parameters, in DTensor form so that gradients coming back from the
sequence shards (Partial sums) are reduced once, on the parameter gradients, rather than as an
activation-sized all-gather at every depth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils._pytree import tree_map

from lbva.models.attention import AttentionKernel, AttentionKernels
from lbva.models.blocks import Depth, DepthState
from lbva.models.mot import ModelPieces

SEQUENCE = Shard(1)  # [B, L, ...]
HEADS = Shard(2)  # [B, L, H, D]


class HeadShardedRMSNorm(nn.Module):
    """RMSNorm over the full num_heads x head_dim width of an input sharded by heads.

    x: DTensor [B, L, H*D] with Shard(-1) over tp. The local sum of squares is a Partial DTensor;
    the division needs it whole, so DTensor all-reduces it ([B, L, 1], tiny). The weight is sharded
    like x, so each rank scales only its own heads.
    """

    def __init__(self, norm: nn.RMSNorm, tp_mesh: DeviceMesh):
        super().__init__()
        self.eps = norm.eps
        self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), tp_mesh, [Shard(0)]))

    def forward(self, x: DTensor) -> DTensor:
        squares = x.float().pow(2).sum(dim=-1, keepdim=True)
        inverse_rms = torch.rsqrt(squares / x.shape[-1] + self.eps)
        return (x.float() * inverse_rms).type_as(x) * self.weight


def _block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    column = ColwiseParallel(use_local_output=False)
    row = RowwiseParallel(output_layouts=SEQUENCE, use_local_output=False)
    plan = {
        "attn1.to_q": column, "attn1.to_k": column, "attn1.to_v": column, "attn1.to_out.0": row,
        "ffn.net.0.proj": column, "ffn.net.2": row,
    }
    if block.attn2 is not None:
        plan.update({
            "norm2": SequenceParallel(use_local_output=False),
            # attn2(x, text, kernel): gather the queries' tokens once for to_q; the text is whole.
            "attn2": PrepareModuleInput(
                input_layouts=(SEQUENCE, Replicate(), None), desired_input_layouts=(Replicate(), Replicate(), None),
                use_local_output=False,
            ),
            "attn2.to_q": column, "attn2.to_k": column, "attn2.to_v": column, "attn2.to_out.0": row,
        })
    return plan


def _gather_tokens_first(project: Callable) -> Callable:
    """q, k and v read the same tokens: all-gather them over the sequence once (one reduce-scatter
    of their gradient in backward), not once per projection."""

    def project_gathered(x: DTensor, rope):
        return project(x.redistribute(x.device_mesh, [Replicate()]), rope)

    return project_gathered


def _parallelize_block(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    parallelize_module(block, tp_mesh, _block_plan(block))
    block.attn1.project = _gather_tokens_first(block.attn1.project)
    for attention in (block.attn1, block.attn2):
        if attention is not None:
            attention.norm_q = HeadShardedRMSNorm(attention.norm_q, tp_mesh)
            attention.norm_k = HeadShardedRMSNorm(attention.norm_k, tp_mesh)
    # Read by modulation() on sequence-sharded tokens: its gradient is Partial, reduced by FSDP or
    # the optimizer when it meets the Replicate parameter.
    block.scale_shift_table = nn.Parameter(distribute_tensor(block.scale_shift_table.detach(), tp_mesh, [Replicate()]))


def _shard_sequence(full: DTensor) -> DTensor:
    """Replicate -> this rank's Shard(1) slice, without communication either way: the gradient of
    the full tensor is this rank's slice zero-padded, declared Partial (summed over tp where it
    meets a parameter), instead of an all-gather per depth."""
    mesh = full.device_mesh
    local = full.to_local(grad_placements=[Partial()])
    size = local.shape[1] // mesh.size()
    part = local.narrow(1, mesh.get_local_rank() * size, size)
    return DTensor.from_local(part, mesh, [SEQUENCE], run_check=False)


def _enter_stream(x: torch.Tensor, tp_mesh: DeviceMesh) -> DTensor:
    if isinstance(x, DTensor):  # the full stream, from the replicated embedders
        return _shard_sequence(x)
    return DTensor.from_local(x, tp_mesh, [SEQUENCE], run_check=False)  # a previous depth's shard


def _replicated(x: torch.Tensor, tp_mesh: DeviceMesh) -> DTensor:
    if isinstance(x, DTensor):
        return x
    return DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)


def _local_kernel(kernel: AttentionKernel, tp_mesh: DeviceMesh) -> AttentionKernel:
    def attend(q: DTensor, k: DTensor, v: DTensor) -> DTensor:
        out = kernel(q.to_local(), k.to_local(), v.to_local())
        return DTensor.from_local(out, tp_mesh, [HEADS], run_check=False)

    return attend


def _sequence_parallel_depth(tp_mesh: DeviceMesh, last: bool) -> Callable[[Callable], Callable]:
    def wrapper(run: Callable) -> Callable:
        def run_sharded(state: DepthState, kernels: AttentionKernels, *blocks):
            sharded = replace(
                state,
                streams=tuple(_enter_stream(x, tp_mesh) for x in state.streams),
                timestep_proj=tuple(_shard_sequence(_replicated(p, tp_mesh)) for p in state.timestep_proj),
                rope=tuple(tuple(_replicated(t, tp_mesh) for t in pair) for pair in state.rope),
                text=_replicated(state.text, tp_mesh),
            )
            local = AttentionKernels(
                _local_kernel(kernels.self_attention, tp_mesh), _local_kernel(kernels.cross_attention, tp_mesh)
            )
            out = run(sharded, local, *blocks)
            if last:
                return tree_map(lambda x: x.redistribute(tp_mesh, [Replicate()]), out)
            return tree_map(lambda x: x.to_local(), out)

        return run_sharded

    return wrapper


def _replicate_outside_depths(model: ModelPieces, tp_mesh: DeviceMesh, depths: list[Depth]) -> None:
    """Every parameter outside the depths becomes a Replicate DTensor (the mesh of all other
    parameters, which FSDP, grad-norm clipping and checkpoints expect), and the modules holding
    them take plain inputs as Replicate DTensors, so backward never mixes the two either."""
    inside = {id(p) for depth in depths for block in depth.blocks for p in block.parameters()}
    for module in model.modules():
        owned = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in inside]
        for name, param in owned:
            module.register_parameter(name, nn.Parameter(distribute_tensor(param.detach(), tp_mesh, [Replicate()])))
        # The model's own parameters (the heads' modulation tables) meet DTensor activations only;
        # its inputs stay plain for the timestep and RoPE arithmetic.
        if owned and module is not model:
            module.register_forward_pre_hook(lambda _, args: tree_map(partial(_replicated_input, tp_mesh=tp_mesh), args))


def _replicated_input(x, tp_mesh: DeviceMesh):
    if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
        return DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)
    return x


def _local_outputs(model: ModelPieces) -> None:
    """Hand the loss plain predictions; every tp rank holds the same, full ones."""
    model.register_forward_hook(lambda _, __, out: tree_map(lambda x: x.to_local() if isinstance(x, DTensor) else x, out))


def apply_tensor_parallel(model: ModelPieces, tp_mesh: DeviceMesh, depths: list[Depth]) -> None:
    """Shard every depth's linears over tp (heads / hidden units), run the depths sequence-parallel
    and the rest replicated. Needs num_heads and each stream's token count divisible by tp
    (ParallelDims.resolve checks both)."""
    for depth in depths:
        for block in depth.blocks:
            _parallelize_block(block, tp_mesh)
        depth.wrap(_sequence_parallel_depth(tp_mesh, last=depth.index == len(depths) - 1))
    _replicate_outside_depths(model, tp_mesh, depths)
    _local_outputs(model)
