"""The one entry point that lays a built LingBotVA out over the mesh: tensor + sequence parallel,
compile, activation checkpointing, FSDP.

Each step wraps what the previous one produced: compile traces the TP'd depth, checkpointing
recomputes the compiled depth (its collectives included), and FSDP's unshard / reshard hooks go
around all of it. torchtitan compiles the checkpointed block instead; torch 2.13 cannot compile a
checkpointed depth whose inputs become DTensors (AOTAutograd saves a DeviceMesh for backward:
"expected all tensors_saved_with_vc_check to be Tensors"), while checkpointing the compiled depth
works and recomputes the same compiled code. Context parallelism needs no model change: Ulysses
wraps the attention kernels, one of the hooks of the step layout (`step_layout_for`,
step_layout.py) through which the objective runs; pipeline parallelism splits the model into
stages and parallelizes each (pipeline.py).

The wrappers find the depths through the model's own `depths()` (models/blocks.py Depth): which
blocks hold a depth's parameters and which one method runs it on the DepthState.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx.experimental import _config as fx_config

from lbva.models.attention import AttentionKernels, Backend
from lbva.models.blocks import Depth, DepthState
from lbva.models.mot import ModelPieces

from .activation_checkpoint import apply_activation_checkpointing
from .context_parallel import ContextParallel, context_parallel_layout
from .fsdp import apply_fsdp
from .mesh import ParallelConfig, ParallelMesh
from .step_layout import StepLayout, plain_layout
from .tensor_parallel import apply_tensor_parallel


def compile_enabled(config: ParallelConfig, device_type: str) -> bool:
    return config.compile == "on" or (config.compile == "auto" and device_type == "cuda")


def apply_compile(depths: list[Depth]) -> None:
    """Compile each depth on its own: the depths share code and dynamo takes their parameters as
    graph inputs, so they reuse the same graphs and compile time does not grow with the depth
    count. See `compiled_depth` for what keeps the graphs valid from step to step."""
    for depth in depths:
        depth.wrap(compiled_depth)


def compiled_depth(run: Callable) -> Callable:
    """`run` (a depth's method: (state, kernels, *blocks) -> streams) compiled once for every packed
    length, so a run compiles one graph for training and one for evaluation (no_grad), not one per
    length. What used to recompile, and what avoids it:

    - lengths: every sequence dim is dynamic from the first call (dynamic=True). Without duck
      shaping, so that two lengths equal by chance in one step (video and action tokens, say) do
      not become one symbol that a later step breaks.
    - masks: built before the depths (models/attention.py build_kernels) and read by the kernels
      as tensors, whose shapes are all a graph guards on.
    - the streams: the first depth receives views (the embedders' outputs), the later ones the
      outputs of a depth; dynamo guards on a view's base, so the first depth's graph would not
      serve the others. The first depth gets copies.
    """
    compiled = torch.compile(run, dynamic=True)

    def call(state: DepthState, kernels: AttentionKernels, *blocks):
        state = state.with_streams(tuple(x if x._base is None else x.clone() for x in state.streams))
        with fx_config.patch(use_duck_shape=False):
            return compiled(state, kernels, *blocks)

    return call


def parallelize(model: ModelPieces, mesh: ParallelMesh, config: ParallelConfig) -> ModelPieces:
    """Apply TP/SP, compile, activation checkpointing and FSDP/HSDP to `model` in place.

    model: built identically (same seed) on every rank, on the mesh's device.
    mesh: from ParallelDims.build_mesh. Returns the same model, ready for an optimizer.
    """
    dims = mesh.dims
    depths = model.depths()
    if dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"], depths)
    if compile_enabled(config, mesh.device_type):
        apply_compile(depths)
    if config.activation_checkpoint != "none":
        apply_activation_checkpointing(depths, config.activation_checkpoint, config.checkpoint_every)
    if dims.fsdp_enabled:
        apply_fsdp(model, mesh.fsdp_mesh, depths, mesh.device_type)
    return model


def step_layout_for(mesh: ParallelMesh | None, backend: Backend) -> StepLayout:
    """How this rank runs a step's objective on `mesh` (None: one process): Ulysses context
    parallelism when the mesh has cp > 1, the plain kernels otherwise. Tensor, data and pipeline
    parallelism need no hooks of their own here: they live in the parallelized model."""
    if mesh is None or not mesh.dims.cp_enabled:
        return plain_layout(backend)
    return context_parallel_layout(ContextParallel.from_mesh(mesh), backend)
