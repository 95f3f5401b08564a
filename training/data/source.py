"""The trainer's data: prepared shards (`lbva data prepare` output) as a stateful stream of
PackedSequence for one data-parallel rank, plus what the run records about them."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import torch

from lbva.errors import UserError
from lbva.models.mot import LingBotVA

from ..config import TrainConfig
from .loader import PackedLoader, PreparedStream
from .packing import PackedSequence
from .split import Split, heldout_keys, split_sources


@dataclass
class ValidationSet:
    """The fixed held-out sequences of one source (or of the training data when nothing is held out)."""

    name: str  # the source's name; "train" for the fallback on training data
    sequences: list[PackedSequence]


@dataclass
class TrainingData:
    batches: PackedLoader  # iterable of PackedSequence with state_dict() / load_state_dict()
    validation: list[ValidationSet]  # per source with held-out episodes, in source order
    sample: PackedSequence  # one sequence of the run's data (token mix for the FLOPs model)
    empty_text: torch.Tensor  # [text_tokens, text_dim], for CFG text dropout
    description: str
    card: dict  # per prepared dataset folder: its card.json
    heldout_keys: dict[str, list[str]]  # source -> held-out sample keys


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


def prepared_stream(config: TrainConfig, model: LingBotVA, *, rank: int = 0, world_size: int = 1, seed: int,
                    select=None, weights=None) -> PreparedStream:
    """A stream over config.data.prepared with the model's geometry and the run's packing."""
    data = config.data
    return PreparedStream(
        data.prepared, rank=rank, world_size=world_size, seed=seed, patch=model.config.patch_size,
        latent_channels=model.config.in_channels, text_tokens=data.text_tokens, token_budget=data.token_budget,
        window_frames=data.window_frames, chunk_multiple=config.objective.chunk_size[1],
        pad_multiple=data.pad_multiple, forward_dynamics=config.objective.forward_dynamics_weight > 0,
        weights=weights, on_error=data.on_error, select=select,
    )


def validation_sets(config: TrainConfig, model: LingBotVA, split: Split) -> list[ValidationSet]:
    """The first data.validation_sequences packed sequences of each source's held-out episodes, from
    a plan of seed 0: the same sequences on every rank, restart and run seed."""
    sets = []
    for heldout in split.heldout:
        stream = prepared_stream(config, model, seed=0, select=lambda _, chosen=heldout: [chosen])
        sequences = [item.sequence for item in itertools.islice(stream, config.data.validation_sequences)]
        sets.append(ValidationSet(heldout.name, sequences))
    return sets


def build_training_data(config: TrainConfig, model: LingBotVA, dp_rank: int = 0, dp_size: int = 1) -> TrainingData:
    """The stream for data-parallel rank `dp_rank` of `dp_size` over the training part of the
    split, and the held-out validation sequences."""
    data = config.data
    splits: list[Split] = []

    def training_part(sources):
        splits.append(split_sources(sources, data.validation_fraction))
        return splits[-1].train

    stream = prepared_stream(config, model, rank=dp_rank, world_size=dp_size, seed=config.run.seed,
                             select=training_part, weights=data.weights())
    _check_text_width(stream.empty_text.shape[-1], model, f"data.prepared {data.prepared[0]}")
    split = splits[0]
    # Global sequence 0 on every rank: bad data in it (data.on_error='fail') stops every rank alike.
    first = prepared_stream(config, model, seed=config.run.seed, select=lambda _: split.train, weights=data.weights())
    sample = next(iter(first)).sequence
    validation = validation_sets(config, model, split) or [ValidationSet("train", [sample])]
    cards = {str(p): json.loads((p / "card.json").read_text()) for p in data.prepared}
    return TrainingData(
        PackedLoader(stream, num_workers=data.num_workers), validation, sample, stream.empty_text,
        f"prepared data {', '.join(str(p) for p in data.prepared)}", cards, heldout_keys(split),
    )
