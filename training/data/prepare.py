"""`lbva data prepare`: a local LeRobot dataset (v2.x or v3.0) -> the prepared format of format.py.

One call prepares one array task's share of one source (the i-th selected episode goes to task
i % num_tasks), in six steps:
  1. plan     the selected episodes (--episodes, --exclude-episodes; all by default) -> samples (one
              per `action_config` segment, else one per episode), grouped into shards of whole
              episodes. The plan depends on the dataset and the settings alone, so a rerun finds the
              same shards and skips the finished ones.
  2. stats    per-source q01/q99 over the raw actions of the training episodes: every planned
              episode but those a `--split NAME=FRACTION` holds out. All tasks compute the same
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

Defaults follow the data: each camera keeps its own size (scaled down to at most 256 px on its long
side, the spec's guidance, and rounded to the 32 px the latent grid needs), and the target fps is
the divisor of the dataset's fps closest to 10 (the higher on a tie).

The held-out split of `--split NAME=FRACTION` is training's own (data/split.py, whole episodes by
source name and episode numbers): prepare picks the episodes `data.validation_fraction=FRACTION`
will hold out, leaves them out of the action statistics and records them in card.json. Training
and `lbva eval` with that fraction then validate on exactly the episodes the statistics never saw.
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
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lbva.errors import UserError
from lbva.quiet import configure_output
from lbva.models.action_space import ACTION_DIM, ActionStats
from lbva.models.encoders import EncoderChoice, default_device, prompt_clean
from lbva.models.tiling import PIXEL_MULTIPLE, make_tiling
from lbva.training.data.action_slots import channels_from_map
from lbva.training.data.alignment import frame_stride
from lbva.training.data.episode_encoder import (
    EpisodeEncoder, EpisodeResult, EpisodeSettings, SamplePlan, latent_frames, stored_text_id,
)
from lbva.training.data.index import SourceIndex, build_table
from lbva.training.data.lerobot import LeRobotDataset, Segment
from lbva.training.data.split import heldout_episodes
from lbva.training.data.writer import (
    TaskIndex, committed_shard, index_path, shard_lines, shard_path, stats_path, temporary_path, texts_path,
    update_card, write_atomic,
)

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "fail")
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a path part and a key prefix: no dots, no slashes
PREFERRED_FPS = 10  # the default target fps is the dataset fps' divisor closest to this
MAX_DEFAULT_SIDE = 256  # default camera sizes are scaled down to this long side, never up


@dataclass
class PrepareConfig:
    """What to prepare and how; `prepare` validates it."""

    src: Path  # LeRobot dataset folder (meta/info.json inside)
    out: Path  # prepared-data root, shared by all sources and tasks
    source: str | None = None  # defaults to the dataset folder's name
    target_fps: int | None = None  # None: default_target_fps of the dataset's fps
    action_channels: list[int] = field(default_factory=list)  # 30-d slot of each action dim; empty: video-only
    action_map: str = ""  # "name=slot,..." (action_slots.py), instead of action_channels
    cameras: list[str] = field(default_factory=list)  # camera keys in tiling order; empty: all, as info.json lists
    layout: str = "side_by_side"
    heights: list[int] = field(default_factory=list)  # empty: default_camera_sizes, from the dataset
    widths: list[int] = field(default_factory=list)
    encoders: EncoderChoice = field(default_factory=EncoderChoice)
    episodes: list[int] = field(default_factory=list)  # the episodes to prepare; empty: all
    exclude_episodes: list[int] = field(default_factory=list)
    split: tuple[str, float] | None = None  # (name, fraction) of the held-out episodes; see the module doc
    task_id: int = 0
    num_tasks: int = 1
    workers: int = 1
    shard_samples: int = 256  # a shard closes at the first episode boundary at or past this many samples
    on_error: str = "skip"
    verbose: bool = False  # spawned workers show the libraries' notices (lbva/quiet.py), as `--verbose` does


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
    episodes: int = 0  # episodes of the source's plan (all tasks)
    heldout: list[int] = field(default_factory=list)  # episodes the split holds out, ascending
    target_fps: int = 0
    camera_sizes: list[tuple[int, int]] = field(default_factory=list)
    text_dim: int = 0  # width of the text embeddings written
    unknown_words: list[str] = field(default_factory=list)  # prompt words the text tokenizer does not know


class EpisodeProgress(Protocol):
    """What `prepare` tells a progress display: the episodes to encode, then each one done."""

    def begin(self, episodes: int) -> None: ...

    def advance(self) -> None: ...


@dataclass
class _ShardPlan:
    number: int
    samples: dict[int, list[SamplePlan]] = field(default_factory=dict)  # episode -> its samples, in order


def prepare(config: PrepareConfig, progress: EpisodeProgress | None = None) -> PrepareReport:
    """Prepare this task's share of `config.src` into `config.out`; returns the report.

    Bad episodes (unreadable video, NaN/inf actions, frame-count mismatch, bad segments) are logged
    with file and episode and skipped, or raise UserError with `on_error="fail"`. Settings mistakes
    and a missing or invalid dataset folder raise UserError. `progress` hears of every episode encoded.
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
    heights, widths = config.heights, config.widths
    if not heights and not widths:
        sizes = default_camera_sizes(dataset, cameras, config.layout)
        heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
    elif not heights or not widths:
        raise UserError("give both --height and --width, or neither (then each camera keeps its own size)")
    tiling = make_tiling(config.layout, len(cameras), heights, widths)
    encoders = config.encoders.describe()
    geometry = encoders["video"]
    target_fps = config.target_fps or default_target_fps(dataset.fps)
    stride = frame_stride(dataset.fps, target_fps)
    channels = _check_channels(_action_channels(config, dataset), dataset)
    report = PrepareReport(source, config.task_id, config.num_tasks, target_fps=target_fps,
                           camera_sizes=list(tiling.camera_sizes), text_dim=int(encoders["text"]["text_dim"]))

    plan = _plan_source(dataset, _selected_episodes(dataset, config), stride, geometry["temporal_factor"])
    report.episodes = len(plan.samples)
    report.heldout = _heldout(source, sorted(plan.samples), config.split)
    shards = _task_shards(plan, config, report)
    stats_file = stats_path(config.out, source)
    if stats_file.is_file():  # written by an earlier run or another task: the same numbers, computed once
        stats = ActionStats.from_dict(json.loads(stats_file.read_text()))
    else:
        stats = _source_stats(dataset, [e for e in sorted(plan.samples) if e not in set(report.heldout)], channels)
    canvas = tiling.canvas_size(geometry["spatial_factor"])
    settings = EpisodeSettings(
        src=dataset.root, source=source, target_fps=target_fps, stride=stride, cameras=tuple(cameras),
        tiling=tiling, channels=tuple(channels), stats=stats, encoders=config.encoders, device=default_device(),
        temporal_factor=geometry["temporal_factor"], canvas=canvas)
    selection = {"episodes": config.episodes, "exclude_episodes": config.exclude_episodes}
    update_card(config.out, source, encoders, {
        "src": str(dataset.root.resolve()), "lerobot_version": dataset.version, "fps": dataset.fps,
        "target_fps": target_fps, "frame_stride": stride, "actions_per_frame": settings.actions_per_frame,
        "cameras": list(cameras), "tiling": {**tiling.to_dict(), "latent_size": list(canvas)},
        "tokens_per_frame": settings.tokens_per_frame, "action_channels": list(channels),
        "stats": stats.to_dict(), "num_tasks": config.num_tasks, "shard_samples": config.shard_samples,
        # Only what was asked for, so a card of a dataset prepared whole stays as it always was.
        **{key: value for key, value in selection.items() if value},
        **({"split": {"name": config.split[0], "fraction": config.split[1], "heldout_episodes": report.heldout}}
           if config.split else {}),
    })
    if not stats_file.is_file():  # only once the card has accepted this source's settings
        write_atomic(stats_file, json.dumps(stats.to_dict(), indent=1).encode())
    texts = {s.text for shard in shards for samples in shard.samples.values() for s in samples}
    report.unknown_words = _unknown_words(sorted(texts), encoders)
    if report.unknown_words:
        log.warning("%s: %d prompt words are unknown to the text encoder's tokenizer and become <unk>: %s "
                    "(`lbva data tiny-encoders OUT --vocab-from SRC` writes a tiny umT5 that knows them)",
                    source, len(report.unknown_words), " ".join(report.unknown_words))
    _save_texts(texts_path(config.out, source, config.task_id), texts | {""}, config.encoders)
    _write_shards(config, settings, shards, report, progress)
    table = build_table(config.out, source)
    _check_split(SourceIndex(source, config.out, table), config, report)
    return report


def default_target_fps(fps: int) -> int:
    """The divisor of the dataset's `fps` closest to PREFERRED_FPS, the higher one on a tie (30 -> 10,
    15 -> 15, 25 -> 5, 24 -> 12, 8 -> 8): frames are taken every fps/target raw steps."""
    return min((d for d in range(1, fps + 1) if fps % d == 0), key=lambda d: (abs(d - PREFERRED_FPS), -d))


def default_camera_sizes(dataset: LeRobotDataset, cameras: list[str], layout: str) -> list[tuple[int, int]]:
    """The pixel size of each camera when --height/--width are not given: its own size, scaled down
    (aspect kept) to MAX_DEFAULT_SIDE on its long side, in multiples of the latent grid's 32 px. Side
    by side, all cameras share the smallest height; the T-shape takes the head's size (a multiple
    of 64, so the half-size wrists stay on the grid)."""
    def fit(h: int, w: int, height: int | None = None, multiple: int = PIXEL_MULTIPLE) -> tuple[int, int]:
        scale = min(1.0, MAX_DEFAULT_SIDE / max(h, w)) if height is None else height / h
        return (max(multiple, round(h * scale / multiple) * multiple),
                max(multiple, round(w * scale / multiple) * multiple))

    own = [dataset.camera_size(key) for key in cameras]
    if layout == "robotwin_tshape":
        return [fit(*own[0], multiple=2 * PIXEL_MULTIPLE)]
    height = min(fit(h, w)[0] for h, w in own)
    return [fit(h, w, height) for h, w in own]


def _validate(config: PrepareConfig) -> None:
    if not 0 <= config.task_id < config.num_tasks:
        raise UserError(f"--task-id {config.task_id} must lie in 0..{config.num_tasks - 1} "
                        f"(--num-tasks {config.num_tasks})")
    for name in ("workers", "shard_samples"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.target_fps is not None and config.target_fps < 1:
        raise UserError(f"--target-fps must be >= 1, got {config.target_fps}")
    if config.on_error not in ON_ERROR:
        raise UserError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{config.on_error}'")
    if config.split is not None and not 0 < config.split[1] < 1:
        raise UserError(f"--split {config.split[0]}={config.split[1]}: the fraction must lie between 0 and 1")
    if config.action_map and config.action_channels:
        raise UserError("give --action-map or --action-channels, not both")


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


def _action_channels(config: PrepareConfig, dataset: LeRobotDataset) -> list[int]:
    """The slots of the action dims, from --action-map (by the dataset's dim names) or --action-channels."""
    if config.action_map and dataset.has_actions:
        return channels_from_map(config.action_map, dataset.feature_names("action"))
    if config.action_map:
        raise UserError(f"{dataset.root} has no 'action' feature (video-only); drop --action-map")
    return config.action_channels


def _selected_episodes(dataset: LeRobotDataset, config: PrepareConfig) -> list[int]:
    """The dataset's episodes that --episodes (default: all) and --exclude-episodes leave."""
    known = set(dataset.episode_indices)
    for option, numbers in (("--episodes", config.episodes), ("--exclude-episodes", config.exclude_episodes)):
        missing = sorted(set(numbers) - known)
        if missing:
            raise UserError(f"{option}: the dataset has no episode {', '.join(map(str, missing[:5]))} "
                            f"(it has {dataset.num_episodes}, numbered {min(known)}..{max(known)})")
    chosen = set(config.episodes) or known
    selected = [e for e in dataset.episode_indices if e in chosen and e not in set(config.exclude_episodes)]
    if not selected:
        raise UserError("--episodes / --exclude-episodes leave no episode to prepare")
    return selected


def _heldout(source: str, episodes: list[int], split: tuple[str, float] | None) -> list[int]:
    """The episodes of the plan that training holds out at the split's fraction (data/split.py)."""
    if split is None:
        return []
    return [int(e) for e in heldout_episodes(_PlannedEpisodes(source, np.asarray(episodes, np.int64)), split[1])]


@dataclass(frozen=True)
class _PlannedEpisodes:
    """The source name and episode numbers `heldout_episodes` chooses from: of the index after
    preparation, of the plan before it (the same episodes unless one turns out bad)."""

    name: str
    episodes: np.ndarray


def _check_split(written: SourceIndex, config: PrepareConfig, report: PrepareReport) -> None:
    """Warn when a bad episode changed which episodes training will hold out: the statistics then
    left out others than the ones validation uses."""
    if config.split is None or config.num_tasks > 1:  # other tasks' shards may still be missing
        return
    actual = [int(e) for e in heldout_episodes(written, config.split[1])]
    if actual != report.heldout:
        log.warning("%s: episodes that failed to prepare changed the held-out split: training will hold out "
                    "%s, the action statistics left out %s", report.source, actual, report.heldout)
        report.heldout = actual


def _bad_episode(config: PrepareConfig, report: PrepareReport, episode: int, message: str) -> None:
    if config.on_error == "fail":
        raise UserError(f"{report.source}: episode {episode}: {message}")
    log.warning("%s: skipping episode %d: %s", report.source, episode, message)
    report.errors.append(EpisodeError(episode, message))


@dataclass
class _SourcePlan:
    """The selected episodes of the whole source, planned from metadata alone: all tasks plan alike,
    since the split and the statistics need every episode."""

    selected: list[int]
    samples: dict[int, list[SamplePlan]] = field(default_factory=dict)  # episodes with samples
    problems: dict[int, str] = field(default_factory=dict)  # episodes with bad metadata -> why
    too_short: dict[int, int] = field(default_factory=dict)  # segments left out per episode


def _plan_source(dataset: LeRobotDataset, episodes: list[int], stride: int, temporal: int) -> _SourcePlan:
    """Every selected episode -> its samples (one per `action_config` segment, else one)."""
    plan = _SourcePlan(episodes)
    for episode in episodes:
        try:
            segments = dataset.segments(episode) or [
                Segment(0, dataset.episode_length(episode), dataset.episode_task(episode))]
        except UserError as err:
            plan.problems[episode] = str(err)
            continue
        samples = []
        for number, segment in enumerate(segments):
            frames = latent_frames(segment.end_frame - segment.start_frame, stride, temporal)
            if frames < 2:  # no action group to learn from
                plan.too_short[episode] = plan.too_short.get(episode, 0) + 1
                continue
            samples.append(SamplePlan(episode, number, segment.start_frame, segment.end_frame, segment.text, frames))
        if samples:
            plan.samples[episode] = samples
    return plan


def _task_shards(plan: _SourcePlan, config: PrepareConfig, report: PrepareReport) -> list[_ShardPlan]:
    """This task's share of the selected episodes (the i-th to task i % num_tasks) -> shards of whole
    episodes; what its share leaves out (bad metadata, too short) goes into the report."""
    shards = [_ShardPlan(0)]
    for position, episode in enumerate(plan.selected):
        if position % config.num_tasks != config.task_id:
            continue
        report.too_short += plan.too_short.get(episode, 0)
        if episode in plan.problems:
            _bad_episode(config, report, episode, plan.problems[episode])
            continue
        if episode not in plan.samples:
            continue
        if sum(map(len, shards[-1].samples.values())) >= config.shard_samples:
            shards.append(_ShardPlan(len(shards)))
        shards[-1].samples[episode] = plan.samples[episode]
    return [shard for shard in shards if shard.samples]


def _source_stats(dataset: LeRobotDataset, episodes: list[int], channels: list[int]) -> ActionStats:
    """Per-slot q01/q99 over all raw actions of `episodes`, the source's training episodes (all zero
    for a video-only source)."""
    q01, q99 = np.zeros(ACTION_DIM), np.zeros(ACTION_DIM)
    if channels:
        chunks = []
        for episode in episodes:
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


def _unknown_words(texts: list[str], encoders: dict) -> list[str]:
    """The prompt words of `texts` that the real text encoder's tokenizer maps to its unknown token
    (the stand-in encoder has no vocabulary)."""
    if encoders["kind"] != "real":
        return []
    from transformers import AutoTokenizer

    from lbva.training.data.describe import prompt_words

    tokenizer = AutoTokenizer.from_pretrained(encoders["text"]["tokenizer_path"])
    if tokenizer.unk_token_id is None:
        return []
    return [word for word in prompt_words([prompt_clean(text) for text in texts])
            if tokenizer.unk_token_id in tokenizer(word, add_special_tokens=False).input_ids]


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


def _init_worker(settings: EpisodeSettings, threads: int, verbose: bool) -> None:
    global _worker_encoder
    configure_output(verbose)  # a spawned process starts with no logging set up: quiet it as its parent
    torch.set_num_threads(threads)
    _worker_encoder = EpisodeEncoder(settings)


def _encode_in_worker(job: tuple[int, list[SamplePlan]]) -> EpisodeResult:
    return _worker_encoder.encode(*job)


@contextmanager
def _episode_results(settings: EpisodeSettings, jobs: list[tuple[int, list[SamplePlan]]],
                     workers: int, verbose: bool) -> Iterator[Iterator[EpisodeResult]]:
    """EpisodeResults in job order, from this process or from a pool of `workers` processes."""
    if workers == 1 or len(jobs) <= 1:
        encoder = EpisodeEncoder(settings)
        yield (encoder.encode(*job) for job in jobs)
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    # spawn, not fork: torch's thread pools do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings, threads, verbose)) as pool:
        yield pool.imap(_encode_in_worker, jobs)


def _write_shards(config: PrepareConfig, settings: EpisodeSettings, shards: list[_ShardPlan],
                  report: PrepareReport, progress: EpisodeProgress | None) -> None:
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
    if progress is not None:
        progress.begin(len(jobs))
    with _episode_results(settings, jobs, config.workers, config.verbose) as results:
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
                    if progress is not None:
                        progress.advance()
            lines = shard_lines(config.out, relative[shard.number], metas)
            index.add(relative[shard.number], lines)
            report.shards_written += 1
            report.samples_written += len(lines)
            log.info("%s: shard %s done (%d samples)", settings.source, relative[shard.number], len(lines))
