"""`lbva eval CHECKPOINT --data PREPARED`: the world model of a checkpoint on the held-out episodes of
prepared data (the training run's split, training/data/split.py), with the inference sampler.
`video_mse` and `action_mse` score the point prediction (one Euler step from pure noise: the
model's conditional mean, what a squared error rewards, averaged over `point_draws` noise draws);
the `_sampled` keys score samples at the
sampler's settings (evaluation/episodes.py says why a sample scores worse).

Writes OUT (default RUN/eval/): summary.json, summary.md (the table) and, per source, pictures of
the first open-loop rollouts: a PNG strip and an mp4 (ground truth | imagined | difference, one
image per latent frame). Under torchrun the held-out samples are dealt to the ranks and the
scores gathered, so the numbers equal a one-process run's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lbva.checkpoints_tools.export import load_model
from lbva.checkpoints_tools.manager import CheckpointError, latest_checkpoint, read_meta
from lbva.errors import UserError
from lbva.inference.settings import InferenceSettings
from lbva.inference.world_model import WorldModelSampler
from lbva.training.baselines import channel_statistics, score_against_prior
from lbva.training.config import TrainConfig
from lbva.training.config_io import load_config
from lbva.training.data.reader import SampleReader, TextStore, read_index
from lbva.training.data.source import validation_sets
from lbva.training.data.split import split_sources
from lbva.training.metrics import open_wandb_run
from lbva.training.step import FlowMatchingObjective
from lbva.training.trainer import sequence_generator

from .episodes import EpisodeScores, score_episode
from .pictures import VideoDecoder, write_pictures

STATISTICS_SAMPLES = 32  # training samples per source for the mean action and the latent statistics


@dataclass
class EvalOptions:
    samples_per_source: int = 8
    rollout_chunks: int = 4
    pictures_per_source: int = 2
    point_draws: int = 8  # noise draws averaged into each point prediction (episodes.py)
    settings: InferenceSettings | None = None  # None: InferenceSettings(video_guidance=1)
    ema: bool = False
    vae: Path | None = None  # for pictures of data prepared with the real Wan2.2 VAE


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """A checkpoint folder or a run folder (its newest checkpoint) -> (checkpoint, run folder)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path / "checkpoints")
        if newest is None:
            raise UserError(f"lbva eval: {path} holds no committed checkpoint")
        return newest, path
    try:
        read_meta(path)
    except CheckpointError as error:
        raise UserError(f"lbva eval: {error}") from error
    return path, path.parent.parent


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _gather(items: list, world: int) -> list:
    if world == 1:
        return items
    gathered: list = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarize(scores: list[EpisodeScores]) -> dict[str, float]:
    """Means over every chunk of every episode in `scores`."""
    pooled = lambda name: [v for s in scores for v in getattr(s, name)]  # noqa: E731
    return {
        "video_mse": _mean(pooled("video_se")), "video_mse_sampled": _mean(pooled("video_sampled_se")),
        "video_mse_copy_last": _mean(pooled("copy_last_se")),
        "video_mse_rollout": _mean(pooled("rollout_se")),
        "video_mse_rollout_copy_last": _mean(pooled("rollout_copy_se")),
        "action_mse": _mean(pooled("action_se")), "action_mse_sampled": _mean(pooled("action_sampled_se")),
        "action_mse_mean": _mean(pooled("action_mean_se")),
        "action_mse_zero": _mean(pooled("action_zero_se")), "episodes": len(scores),
    }


def evaluate(checkpoint: Path, data: list[Path], out: Path | None = None, options: EvalOptions | None = None,
             seed: int = 0) -> dict:
    """Evaluate the checkpoint (or run folder) on the held-out episodes of `data`; -> the summary
    written to OUT/summary.json (module docstring)."""
    options = options or EvalOptions()
    folder, run_dir = resolve_checkpoint(checkpoint)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"lbva eval: {run_dir} has no config.toml (the run's settings: text length, split)")
    config = load_config(TrainConfig, run_dir / "config.toml", [f"data.prepared={[str(p) for p in data]}"])
    out = Path(out) if out is not None else run_dir / "eval"
    rank, world = _distributed()
    torch.manual_seed(seed)
    model = load_model(folder, ema=options.ema).eval()
    settings = options.settings or InferenceSettings(video_guidance=1.0)
    settings.seed = seed

    sources, _ = read_index(data, config.data.on_error)
    split = split_sources(sources, config.data.validation_fraction)
    if not split.heldout:
        raise UserError("lbva eval: nothing is held out of this data (data.validation_fraction 0, or every "
                        "source has a single episode)")
    reader = SampleReader(sources, text_tokens=config.data.text_tokens, latent_channels=model.config.in_channels,
                          patch=model.config.patch_size)
    empty_text = TextStore(sources, config.data.text_tokens).empty_text()
    statistics = [reader.load(s.entry(i)) for s in split.train for i in range(min(len(s), STATISTICS_SAMPLES))]
    mean_c, var_c = channel_statistics([s.latents for s in statistics])

    scores, rollouts = [], []
    jobs = [(h, i) for h in split.heldout for i in range(min(len(h), options.samples_per_source))]
    for number, (heldout, position) in enumerate(jobs):
        if number % world != rank:
            continue
        sample = reader.load(heldout.entry(position))
        known = [s.actions for s in statistics if s.source == heldout.name] or [sample.actions * 0]
        mean_action = torch.stack([a.mean((1, 2)) for a in known]).mean(0)  # [30]
        samplers = [WorldModelSampler(model, chosen, latent_size=tuple(sample.latents.shape[2:]),
                                      actions_per_frame=sample.actions.shape[2], action_mask=sample.action_mask)
                    for chosen in (settings, replace(settings, video_steps=1, action_steps=1))]
        episode, rollout = score_episode(*samplers, sample, empty_text, mean_action, options.rollout_chunks,
                                         options.point_draws)
        scores.append(episode)
        if position < options.pictures_per_source:
            rollouts.append((heldout.name, sample.key, sample.latents[:, :rollout.shape[1]], rollout))
    scores = sorted(_gather(scores, world), key=lambda s: (s.source, s.key))
    rollouts = _gather(rollouts, world)

    summary = {**summarize(scores), "sources": {}}
    objective = FlowMatchingObjective(config.objective, empty_text)
    validation = validation_sets(config, model, split)
    fm_all: list[tuple[float, float]] = []
    for heldout, validation_set in zip(split.heldout, validation):
        drawn = [(seq, objective.draw(seq, sequence_generator(0, -1, i))) for i, seq in enumerate(validation_set.sequences)]
        fm = [scored.video_losses(objective) for scored in score_against_prior(objective, model, drawn, mean_c, var_c)]
        fm_all += fm
        summary["sources"][heldout.name] = {
            **summarize([s for s in scores if s.source == heldout.name]),
            "fm_video": _mean([m for m, _ in fm]), "fm_video_gaussian_prior": _mean([p for _, p in fm]),
        }
    summary.update(fm_video=_mean([m for m, _ in fm_all]), fm_video_gaussian_prior=_mean([p for _, p in fm_all]),
                   checkpoint=str(folder), data=[str(p) for p in data], seed=seed, settings=asdict(settings),
                   out=str(out))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "summary.md").write_text(markdown_table(summary))
        decoder = VideoDecoder.for_card(json.loads((Path(data[0]) / "card.json").read_text()), options.vae)
        summary["pictures"] = write_pictures(decoder, rollouts, out) if decoder is not None else []
        log_to_wandb(config, run_dir, summary)
    if world > 1:
        dist.barrier()
    return summary


def log_to_wandb(config: TrainConfig, run_dir: Path, summary: dict) -> None:
    """When the run logs to wandb: the summary's numbers (as eval/... summary keys) and the pictures
    (strips as images, rollouts as videos) into the training run's own wandb run."""
    run = open_wandb_run(config.run.wandb, config.run.wandb_project, config.run.name, config.run.name, run_dir)
    if run is None:
        return
    import wandb

    media = {}
    for picture in map(Path, summary["pictures"]):
        key = f"eval/{picture.parent.name}/{picture.stem}"
        if picture.suffix == ".png":
            media[f"{key}/strip"] = wandb.Image(str(picture))
        else:
            media[f"{key}/rollout"] = wandb.Video(str(picture), format="mp4")
    run.log(media)
    numbers = {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float)}
    numbers.update({f"eval/{source}/{k}": v for source, values in summary["sources"].items()
                    for k, v in values.items() if isinstance(v, float)})
    run.summary.update(numbers)
    run.finish()


ROWS = (
    ("video, one chunk ahead (latent MSE)", "video_mse", "video_mse_copy_last", "copy last frame"),
    ("video, one chunk ahead, sampled", "video_mse_sampled", "video_mse_copy_last", "copy last frame"),
    ("video, open-loop rollout, sampled", "video_mse_rollout", "video_mse_rollout_copy_last", "copy last frame"),
    ("inverse dynamics (action MSE)", "action_mse", "action_mse_mean", "mean action"),
    ("inverse dynamics, sampled", "action_mse_sampled", "action_mse_mean", "mean action"),
    ("video flow-matching loss", "fm_video", "fm_video_gaussian_prior", "Gaussian prior"),
)


def markdown_table(summary: dict) -> str:
    """The summary as a markdown table: per metric the model, the baseline, and their ratio."""
    lines = ["| source | metric | model | baseline | model / baseline |", "|---|---|---:|---:|---:|"]
    for name, values in [("all", summary), *summary["sources"].items()]:
        for label, ours, theirs, baseline in ROWS:
            a, b = values[ours], values[theirs]
            lines.append(f"| {name} | {label} | {a:.4f} | {b:.4f} ({baseline}) | {a / b if b else float('nan'):.2f} |")
    return "\n".join(lines) + "\n"
