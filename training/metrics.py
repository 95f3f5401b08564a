"""Training metrics: one console line, one JSONL record and one wandb entry per logged step.

The trainer builds one `MetricsLogger` (on rank 0 only: the logger itself knows nothing about
distributed training), calls `log(step, metrics)` every few steps and `close()` at the end, or uses
it as a context manager. `close()` also draws `loss_curve.png` from the whole `metrics.jsonl`, so a
run requeued several times still gets one curve from step 0.

Files under `run_dir`:
- `metrics.jsonl`: one JSON object per `log` call, {"step", "time" (unix seconds), **metrics}.
  Opened in append mode, so a resumed run continues the same file.
- `loss_curve.png`: every "loss*" metric and the per-source validation video and action losses
  ("val/SOURCE/video", "val/SOURCE/action") against step, written by `close()`.
- `wandb/`: wandb's own run folder, for modes "online" and "offline".

Console line: step/total, then the loss terms (keys starting with "loss", total "loss" first),
grad_norm, lr, tokens_per_s, then every other metric as `key value`, then the ETA. Unknown
metrics are printed rather than skipped, so nothing the trainer measures is invisible; only the
per-source breakdowns (keys with a "/", e.g. "val/SOURCE/video") stay off the console, which keeps
one line at six sources, and go to metrics.jsonl, wandb and the curve.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.text import Text

WANDB_MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"

# Keys the JSONL record sets itself; a metric with one of these names would silently overwrite it.
_RESERVED_KEYS = ("step", "time")
# Metrics with a dedicated place and format on the console line, in this order after the losses.
_KNOWN_KEYS = ("grad_norm", "lr", "tokens_per_s")


def open_wandb_run(mode: str, project: str, name: str, run_id: str, run_dir: Path, config: dict | None = None):
    """The run's wandb run (None when mode is "disabled"): one id per training run, kept in
    run_dir/wandb, so a requeued job and a later `lbva eval` continue the same wandb run."""
    if mode == "disabled":
        return None
    # Imported here so that runs with wandb disabled never pay for (or depend on) it.
    import wandb

    return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=run_dir, mode=mode, config=config)


class MetricsLogger:
    """Writes each step's metrics to the console, `run_dir/metrics.jsonl` and wandb.

    Args:
        run_dir: folder of this run; created if missing.
        total_steps: the step count the run ends at, for "step/total" and the ETA.
        wandb_mode: "online", "offline" or "disabled". With "disabled" wandb is never imported.
        wandb_project: wandb project name.
        run_name: human-readable run name (wandb display name and plot title).
        run_id: stable wandb run id; a requeued job passing the same id continues the same run.
        config: the run's configuration, stored with the wandb run.
        console: where the per-step line goes; a default rich Console (stdout) if None.
        start_step: the step this session starts from (the resumed step, else 0); the ETA is the
            mean time per step since the logger was built, over the steps done since start_step.

    `log(step, ...)` takes `step` as the number of optimizer steps completed, so the ETA counts
    `total_steps - step` steps left. wandb ignores a step below the last one its run has seen:
    after resuming from a checkpoint older than the last logged step, the repeated steps reach
    only the console and the JSONL file.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        wandb_mode: str,
        wandb_project: str,
        run_name: str,
        run_id: str,
        config: dict,
        console: Console | None = None,
        start_step: int = 0,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(
                f"wandb_mode must be one of {', '.join(WANDB_MODES)}; got {wandb_mode!r}"
            )
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.run_name = run_name
        self.console = console if console is not None else Console()
        self._start_step = start_step
        self._start_time = time.monotonic()
        self._closed = False

        self._wandb_run: Any = open_wandb_run(wandb_mode, wandb_project, run_name, run_id, self.run_dir, config)

        # Opened after wandb.init so that a failing init leaves no open file behind.
        self._metrics_path = self.run_dir / METRICS_FILE
        # A job killed in the middle of a write can leave a last line without its newline; start on
        # a fresh line so that the first record of this session is not glued onto the broken one.
        needs_newline = _ends_without_newline(self._metrics_path)
        self._file = self._metrics_path.open("a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` (name -> number) for optimizer step `step` everywhere at once.

        Values are converted with float(), so Python, numpy and 0-d torch numbers all work. The
        JSONL line is flushed before returning: a crash of the process afterwards loses nothing.
        """
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        clashing = [key for key in _RESERVED_KEYS if key in metrics]
        if clashing:
            raise ValueError(f"metric names {clashing} are reserved by the metrics record")
        values = {key: float(value) for key, value in metrics.items()}

        record = {"step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

        # soft_wrap keeps the line whole in narrow terminals and in captured job logs.
        self.console.print(self._console_line(step, values), soft_wrap=True)

    def close(self) -> None:
        """Closes the JSONL file, writes loss_curve.png from the whole metrics.jsonl (nothing if
        it holds no loss values yet) and finishes wandb. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        try:
            write_loss_curve(self._metrics_path, self.run_dir / LOSS_CURVE_FILE, self.run_name)
        finally:
            # Finish wandb even if plotting failed, so its files are complete and syncable.
            if self._wandb_run is not None:
                self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _console_line(self, step: int, values: dict[str, float]) -> Text:
        width = len(str(self.total_steps))
        line = Text(f"step {step:>{width}}/{self.total_steps}", style="bold")
        for key in _loss_keys(values):
            line.append(f"  {key} {values[key]:.4g}")
        if "grad_norm" in values:
            line.append(f"  grad_norm {values['grad_norm']:.3g}")
        if "lr" in values:
            line.append(f"  lr {values['lr']:.2e}")
        if "tokens_per_s" in values:
            line.append(f"  tok/s {values['tokens_per_s']:,.0f}")
        shown = set(_loss_keys(values)) | set(_KNOWN_KEYS)
        for key, value in values.items():
            if key not in shown and "/" not in key:
                line.append(f"  {key} {value:.4g}")
        line.append(f"  eta {self._eta(step)}", style="cyan")
        return line

    def _eta(self, step: int) -> str:
        steps_done = step - self._start_step
        if steps_done <= 0:
            return "--"
        seconds_per_step = (time.monotonic() - self._start_time) / steps_done
        return format_duration(seconds_per_step * max(self.total_steps - step, 0))


def read_metrics(path: Path) -> list[dict]:
    """Returns the records of a metrics.jsonl file in file order (one dict per `log` call).

    Blank lines and lines that are not a JSON object (a line cut short by a crash) are skipped,
    so one damaged line never hides the rest of a run's history.
    """
    records = []
    with Path(path).open(encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def write_loss_curve(metrics_path: Path, png_path: Path, title: str) -> None:
    """Plots every "loss*" metric of `metrics_path` against step into `png_path`.

    When a step appears more than once (a resumed run repeats the steps after its last
    checkpoint), the latest record wins. The total "loss" is drawn bold; the y axis is
    logarithmic if every plotted value is positive. Writes nothing when the file holds no loss
    values.
    """
    # step -> value per loss key; later records overwrite earlier ones for the same step.
    curves: dict[str, dict[int, float]] = {}
    for record in read_metrics(metrics_path):
        for key in _loss_keys(record) + _validation_keys(record):
            curves.setdefault(key, {})[record["step"]] = record[key]
    if not curves:
        return

    # Imported here: the training step must import without matplotlib (the GPU image may lack it).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + the Agg canvas directly: no pyplot, so no global backend switch or figure registry.
    figure = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, points in curves.items():
        steps = sorted(points)
        axes.plot(
            steps,
            [points[s] for s in steps],
            label=key,
            linewidth=2.2 if key == "loss" else 1.0,
        )
    finite = [v for points in curves.values() for v in points.values() if math.isfinite(v)]
    if finite and all(v > 0 for v in finite):
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(png_path)


def format_duration(seconds: float) -> str:
    """Formats a duration compactly: "45s", "12m03s", "3h07m09s"."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _validation_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The per-source validation video and action losses of a record."""
    return [key for key in metrics if key.startswith("val/") and key.endswith(("/video", "/action"))]


def _loss_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The loss terms of a record, total "loss" first, the others in their given order."""
    keys = [key for key in metrics if key.startswith("loss")]
    return sorted(keys, key=lambda key: key != "loss")


def _ends_without_newline(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as file:
        file.seek(-1, 2)
        return file.read(1) != b"\n"
