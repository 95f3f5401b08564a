"""FSDP2 (`fully_shard`) over the data-parallel ranks, HSDP when dp_replicate > 1.

One FSDP unit per depth holding the depth's blocks (video and action block of an MoT depth: they
run in one call, so they unshard together), then the root for the embedders and heads.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from lbva.models.blocks import Depth
from lbva.models.mot import ModelPieces


def mixed_precision(device_type: str) -> MixedPrecisionPolicy:
    """bf16 parameters with fp32 gradient reduction on GPU; fp32 throughout on CPU.

    Forward inputs are not cast: timesteps (up to 1000) and RoPE positions lose integer precision
    in bf16, and the model keeps its modulation in fp32 on purpose; autocast casts the matmuls.
    """
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def apply_fsdp(model: ModelPieces, fsdp_mesh: DeviceMesh, depths: list[Depth], device_type: str) -> None:
    """Shard parameters over fsdp_mesh (1-D: FSDP over dp_shard x cp; 2-D: HSDP, replicate x shard).

    The last depth keeps its parameters gathered after forward: backward starts with it.
    """
    policy = mixed_precision(device_type)
    for depth in depths:
        blocks = depth.blocks[0] if len(depth.blocks) == 1 else list(depth.blocks)
        fully_shard(blocks, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=depth.index < len(depths) - 1)
        # The MoT depth runs through joint_forward, not forward: FSDP must unshard around it.
        if depth.method != "forward":
            register_fsdp_forward_method(depth.entry, depth.method)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=policy)
    # The root's outputs are the heads' nn.Linear outputs, which torch returns as views of the
    # matmul result; FSDP2 warns on every forward that an in-place op on such a view would skip its
    # pre-backward hook. Nothing here modifies model outputs in place (the objectives compute new
    # tensors; the layout parity tests check the gradients), so the warning says nothing.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
