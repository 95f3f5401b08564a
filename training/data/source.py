"""The trainer's data: prepared shards (`lbva data prepare` output) as a stateful stream of
PackedSequence for one data-parallel rank, plus what the run records about them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from lbva.errors import UserError
from lbva.models.mot import LingBotVA

from ..config import TrainConfig
from .loader import PackedLoader, PreparedStream
from .packing import PackedSequence


@dataclass
class TrainingData:
    batches: PackedLoader  # iterable of PackedSequence with state_dict() / load_state_dict()
    eval_batch: PackedSequence  # a fixed sequence for the evaluation loss
    empty_text: torch.Tensor  # [text_tokens, text_dim], for CFG text dropout
    description: str
    card: dict  # per prepared dataset folder: its card.json


def check_data_config(config: TrainConfig) -> None:
    """Fail before anything expensive is built when no usable data is configured."""
    if not config.data.prepared:
        raise UserError("no data: set data.prepared to dataset folders written by `lbva data prepare` "
                        "(`lbva data demo PATH` generates a LeRobot dataset to prepare)")
    for folder in config.data.prepared:
        if not (folder / "card.json").exists():
            raise UserError(f"data.prepared: {folder} is not a prepared dataset (no card.json); "
                            "run `lbva data prepare` first")


def _check_text_width(found: int, model: LingBotVA, where: str) -> None:
    if found != model.config.text_dim:
        raise UserError(f"{where}: text embeddings are {found} wide, model.preset expects text_dim "
                        f"{model.config.text_dim}")


def build_training_data(config: TrainConfig, model: LingBotVA, dp_rank: int = 0, dp_size: int = 1) -> TrainingData:
    """The stream for data-parallel rank `dp_rank` of `dp_size`."""
    data = config.data
    stream = PreparedStream(
        data.prepared, rank=dp_rank, world_size=dp_size, seed=config.run.seed, patch=model.config.patch_size,
        latent_channels=model.config.in_channels, text_tokens=data.text_tokens, token_budget=data.token_budget,
        window_frames=data.window_frames, chunk_multiple=config.objective.chunk_size[1],
        pad_multiple=data.pad_multiple, forward_dynamics=config.objective.forward_dynamics_weight > 0,
        weights=data.weights(), on_error=data.on_error,
    )
    _check_text_width(stream.empty_text.shape[-1], model, f"data.prepared {data.prepared[0]}")
    eval_batch = next(iter(stream)).sequence
    cards = {str(p): json.loads((p / "card.json").read_text()) for p in data.prepared}
    return TrainingData(
        PackedLoader(stream, num_workers=data.num_workers), eval_batch, stream.empty_text,
        f"prepared data {', '.join(str(p) for p in data.prepared)}", cards,
    )
