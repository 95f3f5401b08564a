"""The trainer's data: prepared shards (the training path) or a LeRobot folder encoded in-process
with the stand-in encoders (quick experiments). Both give a stateful stream of PackedSequence."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lbva.models.mot import LingBotVA

from .config import TrainConfig
from lbva.errors import UserError
from .packing import PackedSequence


@dataclass
class TrainingData:
    batches: object  # iterable of PackedSequence with state_dict() / load_state_dict()
    eval_batch: PackedSequence  # a fixed sequence for the evaluation loss
    empty_text: torch.Tensor  # [text_tokens, text_dim], for CFG text dropout
    description: str
    card: dict | None = None  # per dataset: its card (prepared) or action statistics (in-process)


def check_data_config(config: TrainConfig) -> None:
    """Fail before anything expensive is built when no usable data is configured."""
    data = config.data
    if data.prepared:
        for folder in data.prepared:
            if not (folder / "card.json").exists():
                raise UserError(f"data.prepared: {folder} is not a prepared dataset (no card.json); "
                                "run `lbva data prepare` first")
        return
    if data.dataset is None:
        raise UserError("no data: set data.prepared (prepared shards) or data.dataset (a LeRobot folder)")
    if not (data.dataset / "meta" / "info.json").exists():
        raise UserError(f"data.dataset: {data.dataset} is not a LeRobot dataset (no meta/info.json); "
                        "run `lbva data demo PATH` to generate one")


def _check_text_width(found: int, model: LingBotVA, where: str) -> None:
    if found != model.config.text_dim:
        raise UserError(f"{where}: text embeddings are {found} wide, model.preset expects text_dim "
                        f"{model.config.text_dim}")


def build_training_data(config: TrainConfig, model: LingBotVA, dp_rank: int = 0, dp_size: int = 1) -> TrainingData:
    """The stream for data-parallel rank `dp_rank` of `dp_size`."""
    data = config.data
    common = dict(
        patch=model.config.patch_size, window_frames=data.window_frames,
        chunk_multiple=config.objective.chunk_size[1], token_budget=data.token_budget,
        pad_multiple=data.pad_multiple, forward_dynamics=config.objective.forward_dynamics_weight > 0,
        seed=config.run.seed,
    )
    if data.prepared:
        from .data.loader import PackedLoader, PreparedStream

        stream = PreparedStream(
            data.prepared, rank=dp_rank, world_size=dp_size, latent_channels=model.config.in_channels,
            text_tokens=data.text_tokens, weights=data.weights(), on_error=data.on_error, **common,
        )
        _check_text_width(stream.empty_text.shape[-1], model, f"data.prepared {data.prepared[0]}")
        eval_batch = next(iter(stream)).sequence
        stats = {str(p): json.loads((p / "card.json").read_text()) for p in data.prepared}
        return TrainingData(
            PackedLoader(stream, num_workers=data.num_workers), eval_batch, stream.empty_text,
            f"prepared data {', '.join(str(p) for p in data.prepared)}", stats,
        )

    from .demo_dataset import build_samples
    from .standin_encoders import StandInTextEncoder, StandInVideoEncoder
    from .stream import PackedStream

    if dp_size != 1:
        raise UserError("data.dataset (in-process encoding) is single-process; prepare shards for parallel runs")
    text_encoder = StandInTextEncoder(text_dim=model.config.text_dim, max_tokens=data.text_tokens)
    samples, stats = build_samples(
        data.dataset, target_fps=data.target_fps, video_encoder=StandInVideoEncoder(),
        text_encoder=text_encoder, action_channels=data.action_channels,
    )
    if samples[0].latents.shape[0] != model.config.in_channels:
        raise UserError(f"data: latents have {samples[0].latents.shape[0]} channels, model.preset "
                        f"'{config.model.preset}' expects {model.config.in_channels}")
    stream = PackedStream(samples, **common)
    return TrainingData(stream, stream.first_sequence(), text_encoder.encode(""),
                        f"{len(samples)} episodes of {data.dataset}", {str(data.dataset): stats.to_dict()})
