"""The complete post-training folder (what the reference server and trainer load) and its check.

    OUT/transformer/   export_post_training's bf16 shards + config.json
    OUT/vae/ OUT/text_encoder/ OUT/tokenizer/   the given local folders, hard-linked or copied
    OUT/empty_emb.pt   umT5 encoding of "" zero-padded to 512 tokens (the trainer's text-dropout input)
    OUT/manifest.json  every file with size and sha256, the source checkpoint, step, config, components

`check_export` reads it back: checksums, the transformer's outputs against the checkpoint's
(the checkpoint's weights rounded to bf16, as exported, so equal weights give difference 0), and
empty_emb.pt's shape and padding.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import torch

from lbva import __version__
from lbva.models.attention import AttentionKernels, sdpa_kernel
from lbva.models.mot import LingBotVA, ModelInputs
from lbva.models.patching import action_positions, video_positions

from .export import export_post_training, load_lingbot_folder, load_model
from .manager import CheckpointError, read_meta, sha256_files

# The file each component folder must hold to be what it claims.
COMPONENT_FILES = {"vae": ("config.json",), "text_encoder": ("config.json",), "tokenizer": ("tokenizer_config.json",)}
EMPTY_EMB = "empty_emb.pt"
MANIFEST = "manifest.json"
TEXT_TOKENS = 512
OUTPUT_TOLERANCE = 1e-3  # bf16 weights read back must reproduce the bf16-rounded checkpoint's outputs


def validate_component(kind: str, folder: Path) -> None:
    """CheckpointError naming the folder and the missing file when `folder` is not a `kind` folder."""
    if not folder.is_dir():
        raise CheckpointError(f"--{kind.replace('_', '-')} {folder}: not a folder")
    for name in COMPONENT_FILES[kind]:
        if not (folder / name).is_file():
            raise CheckpointError(f"--{kind.replace('_', '-')} {folder}: missing {name}")


def link_or_copy_tree(source: Path, target: Path) -> None:
    """Hard links where source and target share a filesystem (no second copy of multi-GB weights)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def empty_text_embedding(text_encoder: Path, tokenizer: Path) -> torch.Tensor:
    """umT5(""): [512, text_dim] float32, rows past the true length (the EOS token) zero."""
    from lbva.models.encoders import UMT5TextEncoder

    (hidden,) = UMT5TextEncoder(tokenizer, text_encoder, "cpu").encode([""])  # [n, text_dim], n tokens of ""
    padded = torch.zeros(TEXT_TOKENS, hidden.shape[1])
    padded[: hidden.shape[0]] = hidden
    return padded


def file_table(out: Path) -> dict[str, dict]:
    paths = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST]
    return {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(paths, sha256_files(paths))}


def export_complete(checkpoint: Path, out: Path, components: dict[str, Path | None], attn_mode: str = "torch",
                    max_shard_bytes: int = 5 << 30, ema: bool = False) -> Path:
    """export_post_training plus the given component folders (keys vae, text_encoder, tokenizer;
    None: absent), empty_emb.pt when both text encoder and tokenizer are given, and manifest.json.
    Every folder is validated before anything is written. Returns the manifest's path."""
    checkpoint, out = Path(checkpoint), Path(out)
    given = {kind: Path(path) for kind, path in components.items() if path is not None}
    for kind, path in given.items():
        validate_component(kind, path)
    meta = read_meta(checkpoint)
    export_post_training(checkpoint, out, attn_mode, max_shard_bytes, ema)
    for kind, path in given.items():
        link_or_copy_tree(path, out / kind)
    if "text_encoder" in given and "tokenizer" in given:
        torch.save(empty_text_embedding(out / "text_encoder", out / "tokenizer"), out / EMPTY_EMB)
    manifest = {
        "lbva_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint.resolve()), "step": meta.get("step"), "ema": ema,
        "preset": meta.get("preset"), "model": meta.get("model"),
        "components": {kind: str(given[kind].resolve()) if kind in given else None for kind in COMPONENT_FILES},
        "empty_emb": (out / EMPTY_EMB).is_file(),
        "files": file_table(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out / MANIFEST


def probe_inputs(config, seed: int = 0) -> ModelInputs:
    """A fixed small input (2 frames of 2x3 video tokens, 4 actions per frame, 5 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    frames, h, w, n = 2, 2, 3, 4
    return ModelInputs(
        video_tokens=torch.randn(1, frames * h * w, config.video_token_dim, generator=g),
        video_timesteps=torch.rand(1, frames * h * w, generator=g) * 1000,
        video_positions=video_positions(frames, h, w)[None],
        action_tokens=torch.randn(1, frames * n, config.action_dim, generator=g),
        action_timesteps=torch.rand(1, frames * n, generator=g) * 1000,
        action_positions=action_positions(frames, n)[None],
        text=torch.randn(1, 5, config.text_dim, generator=g),
    )


def max_output_difference(ours: LingBotVA, theirs: LingBotVA) -> float:
    inputs = probe_inputs(ours.config)
    kernels = AttentionKernels(sdpa_kernel(None), sdpa_kernel(None))
    with torch.no_grad():
        pairs = zip(ours.eval()(inputs, kernels), theirs.eval()(inputs, kernels))
        return max(float((a - b).abs().max()) for a, b in pairs)


def check_export(out: Path, checkpoint: Path | None = None) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) rows: manifest checksums, outputs against `checkpoint` (the
    manifest's when None), empty_emb.pt shape and zero padding."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise CheckpointError(f"{out}: no {MANIFEST}; export it with `lbva export post-training`")
    manifest = json.loads((out / MANIFEST).read_text())
    rows = [_check_files(out, manifest["files"])]
    if rows[0][1]:
        rows.append(_check_outputs(out, Path(checkpoint or manifest["checkpoint"]), manifest.get("ema", False)))
    if (out / EMPTY_EMB).is_file():
        rows.append(_check_empty_emb(out / EMPTY_EMB))
    return rows


def _check_files(out: Path, files: dict[str, dict]) -> tuple[str, bool, str]:
    present = [name for name in files if (out / name).is_file()]
    digests = dict(zip(present, sha256_files([out / name for name in present])))
    bad = [name for name, entry in files.items() if digests.get(name) != entry["sha256"]]
    detail = f"{len(files)} files match" if not bad else f"{len(bad)} differ or are missing: {', '.join(bad[:3])}"
    return "sha256", not bad, detail


def _check_outputs(out: Path, checkpoint: Path, ema: bool) -> tuple[str, bool, str]:
    exported = load_lingbot_folder(out)
    reference = load_model(checkpoint, ema)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16))
    difference = max_output_difference(reference, exported)
    return "outputs", difference <= OUTPUT_TOLERANCE, f"max abs difference {difference:.3g} vs {checkpoint}"


def _check_empty_emb(path: Path) -> tuple[str, bool, str]:
    emb = torch.load(path)
    if emb.dim() != 2 or emb.shape[0] != TEXT_TOKENS:
        return EMPTY_EMB, False, f"shape {list(emb.shape)}, expected [{TEXT_TOKENS}, text_dim]"
    used = int(emb.abs().sum(1).ne(0).sum())
    padded = bool(emb[used:].eq(0).all()) and used > 0
    return EMPTY_EMB, padded, f"shape {list(emb.shape)}, {used} token(s) then zeros" if padded else "not zero-padded"
