"""`lbva data prepare`: a local LeRobot dataset (v2.x or v3.0) -> the prepared format of format.py.

One call prepares one array task's share of one source (episode number i of the dataset goes to task
i % num_tasks), in six steps:
  1. plan     episodes -> samples (one per `action_config` segment, else one per episode), grouped into
              shards of whole episodes. The plan depends on the dataset and the settings alone, so a
              rerun finds the same shards and skips the finished ones.
  2. stats    per-source q01/q99 over every raw action of the source. All tasks compute the same
              numbers; the first to pass the card check writes stats/{source}.json, later ones read it.
  3. card     card.json records encoders, settings and stats per source; other settings on a rerun or
              other encoders for another source into the same OUT are refused (they would mix).
  4. texts    every text of the task's samples plus the empty text, encoded once, saved before any
              shard so every visible shard finds its texts.
  5. shards   episodes are decoded and encoded (by a spawn process pool with --workers > 1, or in this
              process), written into t{task}-{n}.tar.tmp and renamed to .tar when complete; the
              shard's index lines are added after the rename. A stale .tar.tmp from a crash is deleted
              and its shard redone; a finished .tar is never touched again.
  6. table    the source's columnar index (index.py) is rebuilt from the jsonl lines of all its tasks,
              so training opens it in seconds; `lbva data index OUT` does the same by hand.
On a GPU one process (--workers 1) keeps the VAE busy; on CPU nodes a pool of workers, each with its
own VAE and a share of the cores, decodes and encodes episodes in parallel.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM, ActionStats
from lbva.models.encoders import EncoderChoice, default_device
from lbva.models.tiling import make_tiling
from lbva.training.data.alignment import frame_stride
from lbva.training.data.episode_encoder import (
    EpisodeEncoder, EpisodeResult, EpisodeSettings, SamplePlan, latent_frames, stored_text_id,
)
from lbva.training.data.index import build_table
from lbva.training.data.lerobot import LeRobotDataset, Segment
from lbva.training.data.writer import (
    TaskIndex, committed_shard, index_path, shard_lines, shard_path, stats_path, temporary_path, texts_path,
    update_card, write_atomic,
)

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "fail")
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a path part and a key prefix: no dots, no slashes


@dataclass
class PrepareConfig:
    """What to prepare and how; `prepare` validates it."""

    src: Path  # LeRobot dataset folder (meta/info.json inside)
    out: Path  # prepared-data root, shared by all sources and tasks
    source: str | None = None  # defaults to the dataset folder's name
    target_fps: int = 10
    action_channels: list[int] = field(default_factory=list)  # 30-d slot of each action dim; empty: video-only
    cameras: list[str] = field(default_factory=list)  # camera keys in tiling order; empty: all, as info.json lists
    layout: str = "side_by_side"
    heights: list[int] = field(default_factory=lambda: [256])
    widths: list[int] = field(default_factory=lambda: [256])
    encoders: EncoderChoice = field(default_factory=EncoderChoice)
    task_id: int = 0
    num_tasks: int = 1
    workers: int = 1
    shard_samples: int = 256  # a shard closes at the first episode boundary at or past this many samples
    on_error: str = "skip"


@dataclass
class EpisodeError:
    episode: int
    message: str  # names the file at fault


@dataclass
class PrepareReport:
    """What one call did: shards and samples written, and what it left out."""

    source: str
    task_id: int
    num_tasks: int
    shards_written: int = 0
    shards_skipped: int = 0  # finished by an earlier run
    samples_written: int = 0
    too_short: int = 0  # segments under two latent frames at the target fps, left out by design
    errors: list[EpisodeError] = field(default_factory=list)  # bad episodes, skipped


@dataclass
class _ShardPlan:
    number: int
    samples: dict[int, list[SamplePlan]] = field(default_factory=dict)  # episode -> its samples, in order


def prepare(config: PrepareConfig) -> PrepareReport:
    """Prepare this task's share of `config.src` into `config.out`; returns the report.

    Bad episodes (unreadable video, NaN/inf actions, frame-count mismatch, bad segments) are logged
    with file and episode and skipped, or raise UserError with `on_error="fail"`. Settings mistakes
    and a missing or invalid dataset folder raise UserError.
    """
    _validate(config)
    dataset = LeRobotDataset(config.src)
    source = config.source or dataset.root.resolve().name
    if not SOURCE_NAME.fullmatch(source) or "__" in source:
        raise UserError(f"source name '{source}' must be letters, digits, '-' and single '_'; pass --source NAME")
    cameras = config.cameras or dataset.camera_keys
    unknown = [key for key in cameras if key not in dataset.camera_keys]
    if not cameras or unknown:
        raise UserError(f"{config.src}: cameras {unknown or '(none)'} are not video features of the dataset; it has "
                        f"{dataset.camera_keys}")
    tiling = make_tiling(config.layout, len(cameras), config.heights, config.widths)
    encoders = config.encoders.describe()
    geometry = encoders["video"]
    stride = frame_stride(dataset.fps, config.target_fps)
    channels = _check_channels(config.action_channels, dataset)
    report = PrepareReport(source, config.task_id, config.num_tasks)

    shards = _plan(dataset, config, stride, geometry["temporal_factor"], report)
    stats_file = stats_path(config.out, source)
    if stats_file.is_file():  # written by an earlier run or another task: the same numbers, computed once
        stats = ActionStats.from_dict(json.loads(stats_file.read_text()))
    else:
        stats = _source_stats(dataset, channels)
    canvas = tiling.canvas_size(geometry["spatial_factor"])
    settings = EpisodeSettings(
        src=dataset.root, source=source, target_fps=config.target_fps, stride=stride, cameras=tuple(cameras),
        tiling=tiling, channels=tuple(channels), stats=stats, encoders=config.encoders, device=default_device(),
        temporal_factor=geometry["temporal_factor"], canvas=canvas)
    update_card(config.out, source, encoders, {
        "src": str(dataset.root.resolve()), "lerobot_version": dataset.version, "fps": dataset.fps,
        "target_fps": config.target_fps, "frame_stride": stride, "actions_per_frame": settings.actions_per_frame,
        "cameras": list(cameras), "tiling": {**tiling.to_dict(), "latent_size": list(canvas)},
        "tokens_per_frame": settings.tokens_per_frame, "action_channels": list(channels),
        "stats": stats.to_dict(), "num_tasks": config.num_tasks, "shard_samples": config.shard_samples,
    })
    if not stats_file.is_file():  # only once the card has accepted this source's settings
        write_atomic(stats_file, json.dumps(stats.to_dict(), indent=1).encode())
    texts = {s.text for shard in shards for samples in shard.samples.values() for s in samples}
    _save_texts(texts_path(config.out, source, config.task_id), texts | {""}, config.encoders)
    _write_shards(config, settings, shards, report)
    build_table(config.out, source)
    return report


def _validate(config: PrepareConfig) -> None:
    if not 0 <= config.task_id < config.num_tasks:
        raise UserError(f"--task-id {config.task_id} must lie in 0..{config.num_tasks - 1} "
                        f"(--num-tasks {config.num_tasks})")
    for name in ("target_fps", "workers", "shard_samples"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.on_error not in ON_ERROR:
        raise UserError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{config.on_error}'")


def _check_channels(action_channels: list[int], dataset: LeRobotDataset) -> list[int]:
    """The slots of the dataset's action dims; [] for a video-only dataset."""
    if not dataset.has_actions:
        if action_channels:
            raise UserError(f"{dataset.root} has no 'action' feature (video-only); drop --action-channels")
        return []
    shape = dataset.info["features"]["action"].get("shape", [])
    action_dim = int(np.prod(shape)) if shape else 0
    if len(action_channels) != action_dim:
        raise UserError(f"{dataset.root}: --action-channels gives {len(action_channels)} slots but the dataset's "
                        f"actions have {action_dim} dims; give one 30-d slot per action dim")
    if len(set(action_channels)) != len(action_channels) or not all(0 <= c < ACTION_DIM for c in action_channels):
        raise UserError(f"--action-channels {action_channels} must be distinct slots in 0..{ACTION_DIM - 1}")
    return list(action_channels)


def _bad_episode(config: PrepareConfig, report: PrepareReport, episode: int, message: str) -> None:
    if config.on_error == "fail":
        raise UserError(f"{report.source}: episode {episode}: {message}")
    log.warning("%s: skipping episode %d: %s", report.source, episode, message)
    report.errors.append(EpisodeError(episode, message))


def _plan(dataset: LeRobotDataset, config: PrepareConfig, stride: int, temporal: int,
          report: PrepareReport) -> list[_ShardPlan]:
    """This task's episodes -> samples -> shards of whole episodes, from metadata alone."""
    shards = [_ShardPlan(0)]
    for position, episode in enumerate(dataset.episode_indices):
        if position % config.num_tasks != config.task_id:
            continue
        try:
            segments = dataset.segments(episode) or [
                Segment(0, dataset.episode_length(episode), dataset.episode_task(episode))]
        except UserError as err:
            _bad_episode(config, report, episode, str(err))
            continue
        samples = []
        for number, segment in enumerate(segments):
            frames = latent_frames(segment.end_frame - segment.start_frame, stride, temporal)
            if frames < 2:  # no action group to learn from
                report.too_short += 1
                continue
            samples.append(SamplePlan(episode, number, segment.start_frame, segment.end_frame, segment.text, frames))
        if not samples:
            continue
        if sum(map(len, shards[-1].samples.values())) >= config.shard_samples:
            shards.append(_ShardPlan(len(shards)))
        shards[-1].samples[episode] = samples
    return [shard for shard in shards if shard.samples]


def _source_stats(dataset: LeRobotDataset, channels: list[int]) -> ActionStats:
    """Per-slot q01/q99 over all raw actions of the source (all zero for a video-only source)."""
    q01, q99 = np.zeros(ACTION_DIM), np.zeros(ACTION_DIM)
    if channels:
        chunks = []
        for episode in dataset.episode_indices:
            try:
                chunks.append(dataset.read_actions(episode))
            except UserError as err:  # reported when the episode itself is prepared
                log.info("leaving episode %d out of the action statistics: %s", episode, err)
        chunks = [c for c in chunks if c.shape[1] == len(channels)]  # other widths fail when prepared
        if chunks:
            raw = np.concatenate(chunks)
            q01[channels] = np.quantile(raw, 0.01, axis=0)
            q99[channels] = np.quantile(raw, 0.99, axis=0)
    return ActionStats(q01, q99)


def _save_texts(path: Path, texts: set[str], encoders: EncoderChoice) -> None:
    """Encode the texts this task's file lacks and rewrite it: {text id: [true length, D] bfloat16}."""
    stored = load_file(path) if path.is_file() else {}
    missing = sorted(text for text in texts if stored_text_id(text) not in stored)
    if not missing:
        return
    embeddings = encoders.text(default_device()).encode(missing)
    stored.update({stored_text_id(text): emb.to(torch.bfloat16).contiguous()
                   for text, emb in zip(missing, embeddings)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    save_file(stored, str(tmp))
    os.replace(tmp, path)


_worker_encoder: EpisodeEncoder | None = None


def _init_worker(settings: EpisodeSettings, threads: int) -> None:
    global _worker_encoder
    torch.set_num_threads(threads)
    _worker_encoder = EpisodeEncoder(settings)


def _encode_in_worker(job: tuple[int, list[SamplePlan]]) -> EpisodeResult:
    return _worker_encoder.encode(*job)


@contextmanager
def _episode_results(settings: EpisodeSettings, jobs: list[tuple[int, list[SamplePlan]]],
                     workers: int) -> Iterator[Iterator[EpisodeResult]]:
    """EpisodeResults in job order, from this process or from a pool of `workers` processes."""
    if workers == 1 or len(jobs) <= 1:
        encoder = EpisodeEncoder(settings)
        yield (encoder.encode(*job) for job in jobs)
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    # spawn, not fork: torch's thread pools do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings, threads)) as pool:
        yield pool.imap(_encode_in_worker, jobs)


def _write_shards(config: PrepareConfig, settings: EpisodeSettings, shards: list[_ShardPlan],
                  report: PrepareReport) -> None:
    directory = shard_path(config.out, settings.source, config.task_id, 0).parent
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"t{config.task_id:03d}-*.tar.tmp"):
        log.info("removing %s, left by an interrupted run", stale)
        stale.unlink()
    relative = {s.number: str(shard_path(Path(), settings.source, config.task_id, s.number)) for s in shards}
    done = {s.number for s in shards if (config.out / relative[s.number]).is_file()}
    index = TaskIndex(index_path(config.out, settings.source, config.task_id), config.out)
    index.repair([relative[number] for number in sorted(done)])
    report.shards_skipped = len(done)
    pending = [s for s in shards if s.number not in done]
    if not pending:
        return
    jobs = [(episode, samples) for shard in pending for episode, samples in shard.samples.items()]
    with _episode_results(settings, jobs, config.workers) as results:
        for shard in pending:
            metas = []
            with committed_shard(directory, config.task_id, shard.number) as writer:
                for _ in shard.samples:
                    result = next(results)
                    if result.error is not None:
                        _bad_episode(config, report, result.episode, result.error)
                    for members, meta in result.samples:
                        writer.write(members)
                        metas.append(meta)
            lines = shard_lines(config.out, relative[shard.number], metas)
            index.add(relative[shard.number], lines)
            report.shards_written += 1
            report.samples_written += len(lines)
            log.info("%s: shard %s done (%d samples)", settings.source, relative[shard.number], len(lines))
