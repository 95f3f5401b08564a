"""Checkpoint <-> diffusers-style folders: export for post-training, import of released weights.

Post-training folder (what the released LingBot-VA code loads for `lingbot-va-shared`):

    OUT/transformer/config.json                                  model config + attn_mode
    OUT/transformer/diffusion_pytorch_model-00001-of-0000N.safetensors   bf16 shards
    OUT/transformer/diffusion_pytorch_model.safetensors.index.json       weight_map

For the shared layout the tensor names and config keys are the release's (`WanTransformer3DModel`).
For the MoT the names are this project's (video stream = Wan names, action stream `action_*`) and
`_class_name` is `LingBotVAMoT`, with every ModelConfig field in config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from lbva.models.config import ModelConfig
from lbva.models.mot import LingBotVA
from lbva.models.weights import WeightImportError, find_transformer_dir, import_wan_video_stream, read_safetensors_folder

from .manager import (
    CheckpointError, CheckpointManager, RetentionPolicy, _single_process_is_intended, read_dcp_metadata, read_meta,
    verify,
)

WEIGHTS_NAME = "diffusion_pytorch_model"
RELEASED_CLASS = "WanTransformer3DModel"
MOT_CLASS = "LingBotVAMoT"
_EMA_PREFIX = "train.ema.weights."  # DCP's flattened key of TrainState's "ema" (training/ema.py)


def model_config_from_meta(meta: dict, folder: Path) -> ModelConfig:
    try:
        values = dict(meta["model"])
        values["patch_size"] = tuple(values["patch_size"])
        return ModelConfig(**values)
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: its metadata holds no usable model config ({error})") from error


def load_model(folder: Path, ema: bool = False) -> LingBotVA:
    """The model of a committed checkpoint (training or weights-only), full tensors on the CPU;
    CheckpointError when the checkpoint fails `verify` (nothing is read from damaged files).
    ema: its parameters are the checkpoint's moving average of the weights (`optim.ema_decay`)
    instead of the weights themselves."""
    folder = Path(folder)
    meta = read_meta(folder)
    problems = verify(folder)
    if problems:
        raise CheckpointError(f"{folder} is damaged, its weights are not read: {'; '.join(problems)}")
    model = LingBotVA(model_config_from_meta(meta, folder))
    state = {"train": {"model": get_model_state_dict(model)}}
    if ema:
        averaged = ema_names(folder)
        if not averaged:
            raise CheckpointError(f"{folder}: holds no EMA weights (the run had optim.ema_decay = 0); "
                                  "export it without --ema")
        params = dict(model.named_parameters())
        state["train"]["ema"] = {"weights": {name: params[name].detach().clone() for name in averaged}}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(folder))
    model.load_state_dict(state["train"]["model"])
    if ema:
        with torch.no_grad():
            for name, average in state["train"]["ema"]["weights"].items():
                params[name].copy_(average)
    return model


def ema_names(folder: Path) -> list[str]:
    """The parameter names whose moving average a committed checkpoint holds (none: no EMA)."""
    entries = read_dcp_metadata(folder).state_dict_metadata
    return sorted(name[len(_EMA_PREFIX):] for name in entries if name.startswith(_EMA_PREFIX))


def released_config(config: ModelConfig, attn_mode: str) -> dict:
    """config.json as the released LingBot-VA code reads it (shared layout)."""
    return {
        "_class_name": RELEASED_CLASS,
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.in_channels,
        "action_dim": config.action_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.video_ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": True,
        "eps": config.eps,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
        "attn_mode": attn_mode,
    }


def folder_config(config: ModelConfig, attn_mode: str) -> dict:
    if not config.dual_stream:
        return released_config(config, attn_mode)
    return {"_class_name": MOT_CLASS, **json.loads(json.dumps(asdict(config))), "attn_mode": attn_mode}


def write_sharded_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[Path]:
    """Greedy shards in name order, each below max_shard_bytes (a tensor larger than that alone),
    plus the diffusers index json."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = folder / f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return paths


def export_post_training(checkpoint: Path, out: Path, attn_mode: str = "torch", max_shard_bytes: int = 5 << 30,
                         ema: bool = False) -> Path:
    """Checkpoint -> OUT/transformer (bf16 shards + index + config.json). Returns the folder.
    ema: write the checkpoint's moving average of the weights instead of the weights."""
    model = load_model(checkpoint, ema)
    weights = model.state_dict()
    non_finite = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if non_finite:
        raise CheckpointError(f"{checkpoint}: {len(non_finite)} tensor(s) hold NaN or inf "
                              f"({', '.join(non_finite[:3])}{', ...' if len(non_finite) > 3 else ''}); "
                              "nothing exported: export an earlier checkpoint")
    tensors = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in weights.items()}
    folder = Path(out) / "transformer"
    write_sharded_safetensors(tensors, folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(folder_config(model.config, attn_mode), indent=1))
    return folder


def config_from_folder(config_json: dict, source: Path) -> ModelConfig:
    """The ModelConfig of an exported / released transformer folder."""
    if config_json.get("_class_name") == MOT_CLASS:
        names = {f.name for f in fields(ModelConfig)}
        values = {k: v for k, v in config_json.items() if k in names}
        values["patch_size"] = tuple(values["patch_size"])
        return ModelConfig(**values)
    if config_json.get("_class_name") == RELEASED_CLASS and "action_dim" in config_json:
        return ModelConfig(
            layout="shared", num_layers=config_json["num_layers"], num_heads=config_json["num_attention_heads"],
            head_dim=config_json["attention_head_dim"], video_ffn_dim=config_json["ffn_dim"],
            in_channels=config_json["in_channels"], patch_size=tuple(config_json["patch_size"]),
            action_dim=config_json["action_dim"], text_dim=config_json["text_dim"], freq_dim=config_json["freq_dim"],
            eps=config_json["eps"],
        )
    raise WeightImportError(f"{source}: config.json describes neither a LingBot-VA model nor an lbva export")


def load_lingbot_folder(path: Path) -> LingBotVA:
    """A released LingBot-VA (or lbva-exported) transformer folder -> model, strict by name and shape."""
    folder = find_transformer_dir(path)
    config = config_from_folder(json.loads((folder / "config.json").read_text()), folder)
    model = LingBotVA(config)
    tensors = read_safetensors_folder(folder)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise WeightImportError(f"{folder}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise WeightImportError(f"{folder}: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
    model.load_state_dict({name: t.float() for name, t in tensors.items()})
    return model


def write_weights_checkpoint(model: LingBotVA, root: Path, preset: str | None, source: str) -> Path:
    """A step-0, weights-only checkpoint that `checkpoint.resume=PATH` starts a run from."""
    manager = CheckpointManager(root, RetentionPolicy(keep_last=1 << 30), async_save=False)
    meta = json.loads(json.dumps({"model": asdict(model.config), "preset": preset, "contents": "weights",
                                  "imported_from": source}))
    manager.save(0, {"train": {"model": get_model_state_dict(model)}}, meta)
    return root / "step_00000000"


def import_checkpoint(source: Path, root: Path, kind: str, preset: str | None = None) -> Path:
    """kind 'lingbot': a released LingBot-VA transformer folder; kind 'wan': Wan2.2 diffusers
    weights into the video stream of `preset` (the action stream initialised from it)."""
    if kind == "lingbot":
        model = load_lingbot_folder(source)
    elif kind == "wan":
        from lbva.models.config import get_preset

        model = LingBotVA(get_preset(preset))
        import_wan_video_stream(model, source)
    else:
        raise ValueError(f"unknown import kind {kind!r}")
    return write_weights_checkpoint(model, root, preset, str(source))
