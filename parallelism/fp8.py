"""FP8 linear layers: one switch, `fp8: none | torchao | te`, for the video stream's block linears.

Only the Linear layers inside the video stream's blocks (`blocks.N.*`: self-attention q/k/v/out,
cross-attention q/k/v/out, FFN) run in FP8: they carry ~98% of the step's matmul FLOPs (see
parallelism/flops.py). The narrow action stream, the modulation (time_proj), the embedders and the
heads stay bf16: they are small, and the action stream's 768-wide inputs would gain little.
FP8 GEMMs need both dims of a weight to be multiples of 16; so must the token count of a packed
sequence (the packer pads to data.pad_multiple) because the weight gradient contracts over tokens.

Backends:
- torchao: `convert_to_float8_training` swaps the selected nn.Linear for Float8Linear (dynamic
  tensorwise scaling). Apply it before FSDP2; with `fsdp_float8_all_gather` FSDP2 gathers the
  weights in FP8 and `FP8Handle.after_optimizer_step` precomputes their scales in one all-reduce.
  Under DTensor TP use torchao's Float8ColwiseParallel / Float8RowwiseParallel in the TP plan.
- te: Transformer Engine's te.Linear replaces the selected layers and the forward runs under
  te.autocast (te.fp8_autocast before TE 2.x) with a current-scaling or block-scaling recipe.
  TE is imported only here and only when asked for: importing it fails without a GPU driver.
  With a TP group, te.Linear shards its own weight (column-parallel for q/k/v and the FFN input,
  row-parallel for the outputs) and, with sequence parallelism, gathers its input over the first
  dim of the flattened [tokens, width] input, which is the sequence because a packed batch is one
  row. TE holds local (non-DTensor) shards: the rest of the TP plan must treat these layers as
  already parallel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from lbva.errors import UserError

FP8Backend = Literal["none", "torchao", "te"]
TERecipe = Literal["current", "block"]
BACKENDS: tuple[str, ...] = get_args(FP8Backend)
VIDEO_BLOCKS_PREFIX = "blocks."
# Row-parallel under TP: they project back to the residual width and reduce-scatter their output.
_ROW_PARALLEL_SUFFIXES = ("to_out.0", "ffn.net.2")
# Inputs that are not the token sequence (the text), so never sequence-parallel.
_TEXT_INPUT_SUFFIXES = ("attn2.to_k", "attn2.to_v")


def is_video_block_linear(module: nn.Module, fqn: str) -> bool:
    """The module filter: an nn.Linear of the video stream's blocks with both dims multiples of 16."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith(VIDEO_BLOCKS_PREFIX)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers the switch converts."""
    return [name for name, module in model.named_modules() if is_video_block_linear(module, name)]


@dataclass
class FP8Handle:
    """What the training step needs after conversion: the forward's context and the hook to run
    after each optimizer step."""

    backend: str
    description: str
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    after_optimizer_step: Callable[[], None] = field(default=lambda: None)


def check_fp8_available(backend: FP8Backend, option: str = "fp8") -> None:
    """UserError naming `option` unless `backend` can run here: a known backend, a CUDA GPU with
    FP8 tensor cores (compute capability >= 8.9), and the backend's package importable."""
    if backend not in BACKENDS:
        raise UserError(f"{option}: unknown FP8 backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "none":
        return
    if not torch.cuda.is_available():
        raise UserError(
            f"{option}={backend} needs a CUDA GPU with FP8 support and none is available; use {option}=none"
        )
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise UserError(
            f"{option}={backend} needs FP8 tensor cores (compute capability >= 8.9, Ada/Hopper or newer); "
            f"this GPU has {capability[0]}.{capability[1]}; use {option}=none"
        )
    if backend == "torchao":
        try:
            import torchao.float8  # noqa: F401
        except ImportError as error:
            raise UserError(f"{option}=torchao needs torchao: pip install torchao ({error})") from error
    else:
        _import_transformer_engine(option)


def _import_transformer_engine(option: str):
    try:
        import transformer_engine.pytorch as te
    except (ImportError, OSError, RuntimeError) as error:
        # Not installed, or installed without a matching CUDA driver / libraries.
        raise UserError(
            f"{option}=te needs Transformer Engine (shipped in NGC PyTorch containers, or "
            f"pip install transformer-engine[pytorch]); importing it failed: {error}"
        ) from error
    return te


def apply_fp8(
    model: nn.Module,
    backend: FP8Backend,
    *,
    option: str = "fp8",
    fsdp_float8_all_gather: bool = False,
    tp_group=None,
    sequence_parallel: bool = False,
    te_recipe: TERecipe = "current",
) -> FP8Handle:
    """Convert the video stream's block linears of `model` in place for `backend`.

    Call it on the built model on its CUDA device, before FSDP2 (and, for torchao, before or with
    the TP plan). `option` names the config field in error messages. Returns the handle whose
    `autocast()` wraps the forward and whose `after_optimizer_step()` follows each optimizer step.
    """
    check_fp8_available(backend, option)
    if backend == "none":
        return FP8Handle("none", "bf16 (no FP8)")
    if backend == "torchao":
        return convert_with_torchao(model, fsdp_float8_all_gather=fsdp_float8_all_gather)
    return convert_with_transformer_engine(model, tp_group=tp_group, sequence_parallel=sequence_parallel,
                                           recipe=te_recipe, option=option)


def convert_with_torchao(model: nn.Module, *, fsdp_float8_all_gather: bool = False, emulate: bool = False) -> FP8Handle:
    """torchao Float8Linear (dynamic tensorwise scaling) for the selected layers.

    emulate: torchao's emulation, which casts to float8 and back but multiplies in high precision;
    it runs on the CPU and lets machines without an FP8 GPU check the numerics of the conversion.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training, precompute_float8_dynamic_scale_for_fsdp

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather, emulate=emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=is_video_block_linear)
    after_step = (lambda: precompute_float8_dynamic_scale_for_fsdp(model)) if fsdp_float8_all_gather else (lambda: None)
    detail = ", FP8 FSDP all-gather" if fsdp_float8_all_gather else ""
    return FP8Handle("torchao", f"torchao float8, tensorwise dynamic scaling{detail}", after_optimizer_step=after_step)


def _children_to_convert(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, qualified name) of every selected layer, collected before any swap."""
    selected = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            fqn = f"{parent_name}.{child_name}" if parent_name else child_name
            if is_video_block_linear(child, fqn):
                selected.append((parent, child_name, fqn))
    return selected


def _local_shard(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return tensor.chunk(size, dim=dim)[rank] if size > 1 else tensor


def convert_with_transformer_engine(
    model: nn.Module, *, tp_group=None, sequence_parallel: bool = False, recipe: TERecipe = "current",
    option: str = "fp8",
) -> FP8Handle:
    """te.Linear for the selected layers (sharded over `tp_group` when given) and a TE autocast."""
    te = _import_transformer_engine(option)
    from transformer_engine.common.recipe import Float8BlockScaling, Float8CurrentScaling

    # Older TE releases have no block scaling and no way to ask for it.
    block_scaling = getattr(te, "is_fp8_block_scaling_available", lambda: False)()
    if recipe == "block" and not block_scaling:
        raise UserError(f"{option}=te with block scaling needs Hopper or newer and CUDA >= 12.9; use current scaling")
    tp_size = tp_group.size() if tp_group is not None else 1
    tp_rank = tp_group.rank() if tp_group is not None else 0
    for parent, attribute, fqn in _children_to_convert(model):
        linear = getattr(parent, attribute)
        row = fqn.endswith(_ROW_PARALLEL_SUFFIXES)
        replacement = te.Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            params_dtype=linear.weight.dtype, device=linear.weight.device,
            tp_group=tp_group, tp_size=tp_size,
            parallel_mode=("row" if row else "column") if tp_group is not None else None,
            sequence_parallel=sequence_parallel and not fqn.endswith(_TEXT_INPUT_SUFFIXES),
        )
        with torch.no_grad():
            replacement.weight.copy_(_local_shard(linear.weight, 1 if row else 0, tp_rank, tp_size))
            if linear.bias is not None:
                # A row-parallel layer adds its whole bias once, after the reduction.
                replacement.bias.copy_(linear.bias if row else _local_shard(linear.bias, 0, tp_rank, tp_size))
        setattr(parent, attribute, replacement)

    fp8_recipe = Float8BlockScaling() if recipe == "block" else Float8CurrentScaling()

    def autocast() -> contextlib.AbstractContextManager:
        if hasattr(te, "autocast"):
            return te.autocast(enabled=True, recipe=fp8_recipe, amax_reduction_group=tp_group)
        return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe, fp8_group=tp_group)

    return FP8Handle("te", f"Transformer Engine, {recipe} scaling", autocast=autocast)
