"""The one entry point that lays a built LingBotVA out over the mesh: tensor + sequence parallel,
compile, activation checkpointing, FSDP.

Each step wraps what the previous one produced: compile traces the TP'd depth, checkpointing
recomputes the compiled depth (its collectives included), and FSDP's unshard / reshard hooks go
around all of it. torchtitan compiles the checkpointed block instead; torch 2.13 cannot compile a
checkpointed depth whose inputs become DTensors (AOTAutograd saves a DeviceMesh for backward:
"expected all tensors_saved_with_vc_check to be Tensors"), while checkpointing the compiled depth
works and recomputes the same compiled code. Context parallelism needs no model change (Ulysses wraps the attention
kernels, context_parallel.ContextParallelObjective); pipeline parallelism splits the parallelized
model into stages (pipeline.py).
"""

from __future__ import annotations

import torch

from lbva.models.mot import LingBotVA

from .activation_checkpoint import apply_activation_checkpointing
from .depths import Depth, model_depths
from .fsdp import apply_fsdp
from .mesh import ParallelConfig, ParallelMesh
from .tensor_parallel import apply_tensor_parallel


def compile_enabled(config: ParallelConfig, device_type: str) -> bool:
    return config.compile == "on" or (config.compile == "auto" and device_type == "cuda")


def apply_compile(depths: list[Depth]) -> None:
    """Compile each depth on its own: the depths share code and dynamo takes their parameters as
    graph inputs, so they reuse the same graphs (two for 6 tiny depths) and compile time does not
    grow with the depth count."""
    for depth in depths:
        depth.wrap(torch.compile)


def parallelize(model: LingBotVA, mesh: ParallelMesh, config: ParallelConfig) -> LingBotVA:
    """Apply TP/SP, compile, activation checkpointing and FSDP/HSDP to `model` in place.

    model: built identically (same seed) on every rank, on the mesh's device.
    mesh: from ParallelDims.build_mesh. Returns the same model, ready for an optimizer.
    """
    dims = mesh.dims
    depths = model_depths(model)
    if dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"], depths)
    if compile_enabled(config, mesh.device_type):
        apply_compile(depths)
    if config.activation_checkpoint != "none":
        apply_activation_checkpointing(depths, config.activation_checkpoint, config.checkpoint_every)
    if dims.fsdp_enabled:
        apply_fsdp(model, mesh.fsdp_mesh, depths, mesh.device_type)
    return model
