"""Parameter counts per part of a model, for `lbva model-info`."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .mot import LingBotVA

# Parts in print order: (label, parameter-name prefixes).
PARTS = [
    ("video: patch embedding", ("patch_embedding_mlp.",)),
    ("video: time + text embedders", ("condition_embedder.",)),
    ("video: blocks", ("blocks.",)),
    ("video: output head", ("proj_out.", "scale_shift_table")),
    ("action: embedder", ("action_embedder.",)),
    ("action: time embedder", ("condition_embedder_action.",)),
    ("action: blocks", ("action_blocks.",)),
    ("action: output head", ("action_proj_out.", "action_scale_shift_table")),
]


def build_on_meta(config: ModelConfig) -> LingBotVA:
    """The model with no storage behind its parameters: counting a 5B model costs nothing."""
    with torch.device("meta"):
        return LingBotVA(config)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Counts per PARTS label (parts without parameters omitted) plus 'total'."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        label = next((lbl for lbl, prefixes in PARTS if name.startswith(prefixes)), None)
        if label is None:
            raise AssertionError(f"parameter {name} belongs to no part in models/info.py")
        counts[label] = counts.get(label, 0) + param.numel()
    ordered = {label: counts[label] for label, _ in PARTS if label in counts}
    ordered["total"] = sum(counts.values())
    return ordered
