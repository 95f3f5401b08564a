"""Weight import: Wan2.2 diffusers transformer -> video stream; video stream -> action stream init.

Names match diffusers' WanTransformer3DModel except the patch embedding, a Conv3d there and a
Linear here (the same weights reshaped, channel-major), so import is a mapping, not surgery.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from .config import ModelConfig
from .mot import LingBotVA

# diffusers config key -> our ModelConfig field; these must agree for an import to make sense.
_WAN_CONFIG_FIELDS = {
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "ffn_dim": "video_ffn_dim",
    "num_layers": "num_layers",
    "in_channels": "in_channels",
    "text_dim": "text_dim",
    "freq_dim": "freq_dim",
}


class WeightImportError(ValueError):
    """The weights on disk do not fit the model they are imported into."""


def find_transformer_dir(path: Path) -> Path:
    """A diffusers model folder, or a pipeline folder holding `transformer/`."""
    path = Path(path)
    if (path / "transformer" / "config.json").exists():
        return path / "transformer"
    if (path / "config.json").exists():
        return path
    raise WeightImportError(f"{path}: no config.json and no transformer/config.json; not a diffusers model folder")


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's single safetensors file or of its sharded index."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightImportError(f"{folder}: no .safetensors weights found")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.exists():
            raise WeightImportError(f"{file}: shard listed in the index is missing")
        tensors.update(load_file(str(file)))
    return tensors


def check_wan_config(wan_config: dict, config: ModelConfig, source: Path) -> None:
    for theirs, ours in _WAN_CONFIG_FIELDS.items():
        if wan_config.get(theirs) != getattr(config, ours):
            raise WeightImportError(
                f"{source}: {theirs}={wan_config.get(theirs)} does not match the model's {ours}={getattr(config, ours)}"
            )
    if tuple(wan_config.get("patch_size", ())) != tuple(config.patch_size):
        raise WeightImportError(f"{source}: patch_size {wan_config.get('patch_size')} != {list(config.patch_size)}")


def wan_to_video_stream(wan_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers Wan state dict into our video-stream names."""
    mapped = {}
    for name, tensor in wan_state.items():
        if name == "patch_embedding.weight":
            tensor = tensor.reshape(tensor.shape[0], -1)  # Conv3d [D, C, pt, ph, pw] -> Linear [D, C*pt*ph*pw]
        if name.startswith("patch_embedding."):
            name = name.replace("patch_embedding.", "patch_embedding_mlp.")
        mapped[name] = tensor
    return mapped


def import_wan_video_stream(model: LingBotVA, path: Path) -> list[str]:
    """Load Wan2.2 diffusers weights into the video stream; returns the model's names left untouched.

    For the shared layout the action time embedder starts as a copy of the video one, as the
    release does; for the MoT the action stream is initialised from the video weights
    (`init_action_stream_from_video`).
    """
    folder = find_transformer_dir(path)
    check_wan_config(json.loads((folder / "config.json").read_text()), model.config, folder)
    video_state = wan_to_video_stream(read_safetensors_folder(folder))
    own = model.state_dict()
    unexpected = sorted(set(video_state) - set(own))
    if unexpected:
        raise WeightImportError(f"{folder}: tensors with no place in the model: {unexpected[:5]}")
    for name, tensor in video_state.items():
        if own[name].shape != tensor.shape:
            raise WeightImportError(f"{folder}: {name} has shape {tuple(tensor.shape)}, model wants {tuple(own[name].shape)}")
    missing_video = [n for n in own if _is_video_stream(n) and n not in video_state]
    if missing_video:
        raise WeightImportError(f"{folder}: video-stream tensors missing from the checkpoint: {missing_video[:5]}")
    model.load_state_dict(video_state, strict=False)
    if not model.config.dual_stream:
        model.condition_embedder_action.load_state_dict(model.condition_embedder.state_dict())
    else:
        init_action_stream_from_video(model)
    return sorted(n for n in own if n not in video_state)


def _is_video_stream(name: str) -> bool:
    return not name.startswith(("action_", "condition_embedder_action."))


def resize_like(source: torch.Tensor, shape: torch.Size, last_axis_is_fan_in: bool = False) -> torch.Tensor:
    """Resize every mismatched axis by 1-D linear interpolation (align_corners=True). For a Linear
    weight (last axis = fan-in) whose fan-in shrinks, scale by sqrt(old/new) so the layer's output
    variance is preserved; biases, norms and modulation tables are resized without scaling."""
    out = source.float()
    if out.dim() != len(shape):
        raise ValueError(f"cannot resize {tuple(source.shape)} to {tuple(shape)}")
    for axis, size in enumerate(shape):
        if out.shape[axis] == size:
            continue
        moved = out.movedim(axis, -1)
        lead = moved.shape[:-1]
        resized = F.interpolate(moved.reshape(-1, 1, moved.shape[-1]), size=size, mode="linear", align_corners=True)
        out = resized.reshape(*lead, size).movedim(-1, axis)
    if last_axis_is_fan_in and source.shape[-1] != shape[-1]:
        out = out * math.sqrt(source.shape[-1] / shape[-1])
    return out.to(source.dtype)


def init_action_stream_from_video(model: LingBotVA) -> None:
    """The paper's "copy init" (spec 1.3): each action-block tensor is the matching video tensor
    interpolated to the action shapes and scaled by sqrt(d_in_video / d_in_action) (= 2 for
    3072 -> 768 inputs). time_proj is resized per modulation chunk so shift/scale/gate rows never
    mix. The action encoder and decoder stay randomly initialised."""
    if not model.config.dual_stream:
        raise ValueError("the shared layout has no separate action stream to initialise")
    with torch.no_grad():
        for video_block, action_block in zip(model.blocks, model.action_blocks):
            video_params = dict(video_block.named_parameters())
            for name, param in action_block.named_parameters():
                param.copy_(resize_like(video_params[name], param.shape, _is_linear_weight(name, param)))
        video_time = model.condition_embedder
        action_time = model.condition_embedder_action
        for name in ("linear_1", "linear_2"):
            for kind in ("weight", "bias"):
                target = getattr(getattr(action_time.time_embedder, name), kind)
                source = getattr(getattr(video_time.time_embedder, name), kind)
                target.copy_(resize_like(source, target.shape, kind == "weight"))
        for kind in ("weight", "bias"):
            target = getattr(action_time.time_proj, kind)
            chunked = getattr(video_time.time_proj, kind).unflatten(0, (6, -1))
            resized = resize_like(chunked, target.unflatten(0, (6, -1)).shape, kind == "weight")
            target.copy_(resized.flatten(0, 1))
        model.action_scale_shift_table.copy_(resize_like(model.scale_shift_table, model.action_scale_shift_table.shape))


def _is_linear_weight(name: str, param: torch.Tensor) -> bool:
    return name.endswith(".weight") and param.dim() == 2
