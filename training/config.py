"""The one config tree of a training run: dataclasses with defaults, loaded from TOML plus
command-line overrides by training/config_io.py, validated once at start-up."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lbva.models.config import PRESETS, ModelConfig, get_preset
from lbva.models.flow_schedule import LOSS_WEIGHTINGS
from lbva.parallelism.mesh import ParallelConfig

from lbva.errors import UserError


def _check_range(name: str, pair: tuple, low: float) -> None:
    if len(pair) != 2 or pair[0] > pair[1] or pair[0] < low:
        raise UserError(f"{name} must be [low, high] with {low} <= low <= high, got {list(pair)}")


def _check_number(name: str, value: float, low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, high_open: bool = False) -> None:
    """A UserError naming `name` unless `value` is finite and inside the bounds (None: unbounded;
    open: the bound itself is excluded). NaN and inf fail every comparison a plain `< 0` would pass."""
    inside = math.isfinite(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        bounds = [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
                  f"{'<' if high_open else '<='} {high:g}" if high is not None else ""]
        wanted = " and ".join(b for b in bounds if b)
        raise UserError(f"{name} must be a finite number{' ' + wanted if wanted else ''}, got {value}")


@dataclass
class RunConfig:
    name: str = "lbva"
    output_dir: Path = Path("runs")
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    wandb_project: str = "lingbot-va-pretrain"
    # [first, last] steps to record with the torch profiler on the logging rank (training/profiling.py).
    profile_steps: list[int] = field(default_factory=list)
    # Validation losses on the held-out sequences every this many steps (and at the last step);
    # 0: at every logged step.
    eval_every: int = 0

    def validate(self) -> None:
        # The run folder is output_dir/name: a name must not lead anywhere else.
        if not self.name.strip() or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise UserError(f"run.name must be a non-empty folder name without path separators or '..', "
                            f"got {self.name!r}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"run.seed must lie in [0, 2**63), got {self.seed}")
        if self.steps < 1:
            raise UserError(f"run.steps must be >= 1, got {self.steps}")
        if self.log_every < 1:
            raise UserError(f"run.log_every must be >= 1, got {self.log_every}")
        if self.eval_every < 0:
            raise UserError(f"run.eval_every must be >= 0 (0: with every log), got {self.eval_every}")
        if self.profile_steps and (len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise UserError(f"run.profile_steps must be [first, last] with 1 <= first <= last, got {self.profile_steps}")

    def make_dir(self) -> Path:
        """Create the run folder output_dir/name (and its parents) -> its path; a path that cannot
        be a folder (read-only, a file in the way, disk full) ends in a UserError naming it."""
        run_dir = self.output_dir / self.name
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"run.output_dir: {run_dir} cannot be a folder: a file is in the way") from None
        except OSError as error:
            raise UserError(f"run.output_dir: cannot create {run_dir}: {error.strerror}") from None
        if not os.access(run_dir, os.W_OK | os.X_OK):  # an existing folder on a read-only mount, or not ours
            raise UserError(f"run.output_dir: {run_dir} is not writable")
        return run_dir


@dataclass
class ModelSection:
    preset: str = "lingbot-va-5b-mot"
    attention: Literal["auto", "flex", "sdpa"] = "auto"
    # A Wan2.2-TI2V-5B diffusers folder (or its transformer/) to initialise the video stream from.
    init_from_wan: Path | None = None
    # Size overrides on the preset (None: the preset's): the video stream's width (num_heads x
    # head_dim), its attention heads (head_dim = width / heads) and the depth of both streams.
    width: int | None = None
    heads: int | None = None
    layers: int | None = None

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"model.preset: unknown preset '{self.preset}'; known presets: {', '.join(PRESETS)}")
        if self.init_from_wan is not None and not self.init_from_wan.exists():
            raise UserError(f"model.init_from_wan: {self.init_from_wan} does not exist")
        self.model_config()

    def model_config(self) -> ModelConfig:
        """The preset with this section's size overrides, validated by ModelConfig.validate: the one
        ModelConfig of a run (the trainer, the layout checks and the planner all build from it)."""
        preset = PRESETS[self.preset]
        overrides = {key: value for key, value in (("width", self.width), ("heads", self.heads),
                                                   ("layers", self.layers)) if value is not None}
        for key, value in overrides.items():
            if value < 1:
                raise UserError(f"model.{key} must be >= 1, got {value}")
        heads = overrides.get("heads", preset.num_heads)
        width = overrides.get("width", preset.video_width)
        spelled = " ".join(f"model.{key}={value}" for key, value in overrides.items())
        if width % heads:
            raise UserError(f"{spelled}: the video width {width} must divide into {heads} heads")
        try:
            return get_preset(self.preset, num_heads=heads, head_dim=width // heads,
                              num_layers=overrides.get("layers", preset.num_layers))
        except ValueError as error:
            raise UserError(f"model.preset {self.preset} with {spelled}: {error}") from None


@dataclass
class DataSection:
    # Prepared datasets (`lbva data prepare` output folders): the training path.
    prepared: list[Path] = field(default_factory=list)
    # Source mixture weights as "source=weight" (sources not named: 1.0). Default: uniform.
    source_weights: list[str] = field(default_factory=list)
    on_error: Literal["skip", "fail"] = "skip"  # bad samples: log, count and skip, or stop
    num_workers: int = 0  # DataLoader workers reading and packing shards
    target_fps: int = 10  # the frame rate `lbva demo` prepares its dataset at
    text_tokens: int = 512
    window_frames: int = 64
    token_budget: int = 10240  # the paper packs up to 10K tokens per sequence
    pad_multiple: int = 128
    # Held-out split (data/split.py): this fraction of each source's episodes is never trained on;
    # validation evaluates `validation_sequences` packed sequences of them per source.
    validation_fraction: float = 0.02
    validation_sequences: int = 2
    # The run stops, naming the sources and shards, when more than this fraction of its sample
    # reads (all ranks) were bad and skipped (data.on_error=skip): judged from 20 reads on, and at
    # once at a step without a single real token (training/guard.py DataGuard).
    max_skipped_fraction: float = 0.1

    def weights(self) -> dict[str, float] | None:
        """source_weights as a mapping (None: uniform)."""
        if not self.source_weights:
            return None
        parsed = {}
        for item in self.source_weights:
            name, _, value = item.partition("=")
            try:
                parsed[name] = float(value)
            except ValueError:
                raise UserError(f"data.source_weights: '{item}' is not SOURCE=WEIGHT") from None
            if not name or not math.isfinite(parsed[name]) or parsed[name] < 0:
                raise UserError(f"data.source_weights: '{item}' needs a source name and a finite weight >= 0")
        return parsed

    def validate(self) -> None:
        self.weights()
        if self.num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("target_fps", "text_tokens", "window_frames", "token_budget", "pad_multiple",
                     "validation_sequences"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        _check_number("data.validation_fraction", self.validation_fraction, 0.0, 1.0, high_open=True)
        _check_number("data.max_skipped_fraction", self.max_skipped_fraction, 0.0, 1.0)


@dataclass
class ObjectiveConfig:
    video_shift: float = 5.0
    action_shift: float = 1.0
    action_weight: float = 1.0  # lambda of L_video + lambda * L_action
    # > 0 adds the forward-dynamics loss (paper Eq. 13, post-training for async deployment).
    forward_dynamics_weight: float = 0.0
    noisy_history_prob: float = 0.5
    # Per-frame loss weight over the noise level (models/flow_schedule.py LOSS_WEIGHTINGS): "bell"
    # is the reference's; "uniform" also trains the near-pure-noise levels the sampler starts from.
    loss_weighting: str = "bell"
    text_dropout: float = 0.1
    chunk_size: tuple[int, int] = (1, 4)  # K ~ U{low..high} per step
    attention_window: tuple[int, int] = (4, 64)  # W ~ U{low..high} per step

    def validate(self) -> None:
        for name in ("video_shift", "action_shift"):
            _check_number(f"objective.{name}", getattr(self, name), 0.0, low_open=True)
        for name in ("noisy_history_prob", "text_dropout"):
            _check_number(f"objective.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("action_weight", "forward_dynamics_weight"):
            _check_number(f"objective.{name}", getattr(self, name), 0.0)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise UserError(f"objective.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                            f"got '{self.loss_weighting}'")
        _check_range("objective.chunk_size", self.chunk_size, 1)
        _check_range("objective.attention_window", self.attention_window, 0)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 2.0
    # A step whose loss or gradient norm is not finite is skipped (no update) on every rank; this
    # many in a row stop the run with the last good weights checkpointed.
    max_nonfinite_steps: int = 3
    # > 0 keeps an exponential moving average of the weights (training/ema.py), updated after each
    # optimizer step, checkpointed and exported with `--ema`; 0 keeps none.
    ema_decay: float = 0.0

    def validate(self) -> None:
        _check_number("optim.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        # AdamW moves each weight by about lr per step: above 1 nothing trains (and above float32's
        # range the step itself fails).
        _check_number("optim.lr", self.lr, 0.0, 1.0, low_open=True)
        for index, beta in enumerate(self.betas):
            _check_number(f"optim.betas[{index}]", beta, 0.0, 1.0, high_open=True)
        _check_number("optim.eps", self.eps, 0.0, low_open=True)
        _check_number("optim.weight_decay", self.weight_decay, 0.0)
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_number("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_number("optim.grad_clip", self.grad_clip, 0.0, low_open=True)
        if self.max_nonfinite_steps < 1:
            raise UserError(f"optim.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between saves; 0 saves only at the end
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    async_save: bool = True
    # "none", "auto" (the newest complete checkpoint of this run, if any) or a checkpoint folder.
    resume: str = "none"

    def validate(self) -> None:
        if self.every < 0 or self.keep_last < 1 or self.keep_every < 0:
            raise UserError("checkpoint.every and checkpoint.keep_every must be >= 0, checkpoint.keep_last >= 1")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# The embedded demo: the procedural pushing world and the demo-mot preset, sized for 2 CPU cores.
# `lbva demo` layers these over the defaults above; configs/demo.toml spells out the same values.
DEMO_BASE: dict = {
    # Steps over batch size: one episode per process and step learns more in the demo's minutes than
    # three, and one chunk ahead the video beats copying the last frame from ~1000 steps on (450:
    # 4-8% behind; docs/benchmarks.md, the demo's one-chunk bar); the held-out loss every 50 steps.
    "run": {"name": "demo", "steps": 1000, "log_every": 10, "eval_every": 50},
    "model": {"preset": "demo-mot"},
    "data": {
        # Windows of 16 latent frames hold a whole demo episode (13): training then sees the history
        # lengths `lbva eval` conditions on (docs/benchmarks.md, the demo's video one chunk ahead).
        "prepared": ["runs/demo-prepared"], "text_tokens": 16, "window_frames": 16, "token_budget": 1024,
        "pad_multiple": 64,
        # 5 of the 48 episodes held out: the validation loss and `lbva eval` at the end score them.
        "validation_fraction": 0.1, "validation_sequences": 4,
    },
    # A 4.3M-parameter model learning from nothing in 1000 steps (docs/benchmarks.md, the world-model
    # evaluation): every noise level weighted alike, so the near-pure-noise frames, which only the
    # history can tell, train too; a clean history, so it is worth reading; chunks of K = 4, the
    # chunk the demo's inference and eval use; an lr well above the 5B recipe's peak.
    "objective": {"loss_weighting": "uniform", "noisy_history_prob": 0.0, "chunk_size": [4, 4]},
    "optim": {"lr": 3e-3},
    # Two processes, each with the whole model (FSDP2 over a replicate mesh: one gradient all-reduce
    # per step, gloo on CPU). dp_shard=2 shards the parameters instead; its per-layer all-gathers
    # cost the demo ~15% a step on 2 cores (1.0 s vs 0.85 s), and tp=2 on top (4 processes) is
    # several times slower.
    "parallel": {"dp_replicate": 2},
}
