"""Tests for lbva.training.metrics: JSONL records, console line, loss curve and wandb modes."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from lbva.training import metrics
from lbva.training.metrics import MetricsLogger, format_duration, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_logger(run_dir: Path, console: Console | None = None, **overrides) -> MetricsLogger:
    kwargs = dict(
        total_steps=100,
        wandb_mode="disabled",
        wandb_project="test-project",
        run_name="test-run",
        run_id="run0001",
        config={"lr": 1e-4},
        console=console if console is not None else Console(file=io.StringIO(), width=200),
    )
    kwargs.update(overrides)
    return MetricsLogger(run_dir, **kwargs)


def test_jsonl_records_step_time_and_metrics(tmp_path: Path) -> None:
    with make_logger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5, "loss_video": 0.3, "grad_norm": 1.5})
        logger.log(2, {"loss": 0.4, "loss_video": 0.2, "grad_norm": 1.2})

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["loss"] == 0.4 and records[1]["loss_video"] == 0.2
    assert records[0]["grad_norm"] == 1.5
    assert all(isinstance(r["time"], float) for r in records)


def test_jsonl_line_is_on_disk_before_close(tmp_path: Path) -> None:
    logger = make_logger(tmp_path)
    logger.log(3, {"loss": 0.25})
    # Read while the logger is still open: a crash at this point must not lose the line.
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 0.25
    logger.close()


def test_resumed_logger_appends_to_existing_file(tmp_path: Path) -> None:
    with make_logger(tmp_path) as first:
        first.log(1, {"loss": 1.0})
        first.log(2, {"loss": 0.9})
    with make_logger(tmp_path, start_step=2) as resumed:
        resumed.log(3, {"loss": 0.8})

    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_resume_after_truncated_line_keeps_new_records(tmp_path: Path) -> None:
    with make_logger(tmp_path) as first:
        first.log(1, {"loss": 1.0})
    # Simulate a job killed in the middle of writing its second line.
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 2, "lo')
    with make_logger(tmp_path, start_step=1) as resumed:
        resumed.log(2, {"loss": 0.9})

    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_console_line_shows_step_losses_known_metrics_and_eta(tmp_path: Path) -> None:
    buffer = io.StringIO()
    with make_logger(tmp_path, console=Console(file=buffer, width=200)) as logger:
        logger.log(
            10,
            {
                "loss": 0.4321,
                "loss_video": 0.3012,
                "loss_action": 0.1309,
                "grad_norm": 1.25,
                "lr": 3e-4,
                "tokens_per_s": 12345.6,
                "mfu": 0.41,
            },
        )

    line = buffer.getvalue()
    assert line.count("\n") == 1
    assert "10/100" in line
    assert "loss 0.4321" in line
    assert "loss_video 0.3012" in line
    assert "loss_action 0.1309" in line
    assert "grad_norm 1.25" in line
    assert "lr 3.00e-04" in line
    assert "tok/s 12,346" in line
    assert "mfu 0.41" in line
    assert re.search(r"eta (\d+h)?(\d+m)?\d+s", line)


def test_eta_uses_mean_time_per_step_since_start_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([1000.0, 1060.0])  # logger built at t=1000 s, first log 60 s later
    # Replace the module's view of `time` only, not the global time.monotonic pytest also uses.
    fake_time = SimpleNamespace(monotonic=lambda: next(clock), time=time.time)
    monkeypatch.setattr(metrics, "time", fake_time)
    buffer = io.StringIO()
    logger = make_logger(tmp_path, console=Console(file=buffer, width=200), start_step=40)
    logger.log(50, {"loss": 1.0})  # 10 steps in 60 s -> 6 s/step, 50 steps left -> 300 s
    logger.close()

    assert "eta 5m00s" in buffer.getvalue()


def test_format_duration() -> None:
    assert format_duration(45) == "45s"
    assert format_duration(723) == "12m03s"
    assert format_duration(3 * 3600 + 7 * 60 + 9) == "3h07m09s"


def test_close_writes_loss_curve_png(tmp_path: Path) -> None:
    logger = make_logger(tmp_path)
    for step in range(1, 21):
        logger.log(step, {"loss": 1.0 / step, "loss_video": 0.6 / step, "lr": 1e-4})
    png = tmp_path / "loss_curve.png"
    assert not png.exists()
    logger.close()

    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000  # an 800x500 plot with curves and text, not an empty image


def test_close_without_metrics_writes_no_png(tmp_path: Path) -> None:
    make_logger(tmp_path).close()
    assert not (tmp_path / "loss_curve.png").exists()


def test_close_is_idempotent_and_log_after_close_fails(tmp_path: Path) -> None:
    logger = make_logger(tmp_path)
    logger.log(1, {"loss": 1.0})
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError):
        logger.log(2, {"loss": 0.5})


def test_reserved_metric_name_is_rejected(tmp_path: Path) -> None:
    with make_logger(tmp_path) as logger, pytest.raises(ValueError, match="step"):
        logger.log(1, {"step": 5.0})


def test_invalid_wandb_mode_names_allowed_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        make_logger(tmp_path, wandb_mode="dryrun")
    for mode in ("online", "offline", "disabled"):
        assert mode in str(error.value)


def test_disabled_mode_never_imports_wandb(tmp_path: Path) -> None:
    # A fresh interpreter: in this one another test may already have imported wandb.
    script = textwrap.dedent(
        f"""
        import io, sys
        from pathlib import Path
        from rich.console import Console
        from lbva.training.metrics import MetricsLogger

        with MetricsLogger(
            Path({str(tmp_path)!r}), total_steps=10, wandb_mode="disabled", wandb_project="p",
            run_name="r", run_id="id", config={{}}, console=Console(file=io.StringIO()),
        ) as logger:
            logger.log(1, {{"loss": 1.0}})
        print("wandb" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_offline_mode_writes_wandb_run_under_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep wandb quiet, local and away from the home directory; nothing here needs a network.
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"

    with make_logger(run_dir, wandb_mode="offline", run_id="offline01") as logger:
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 0.5})

    run_folders = list((run_dir / "wandb").glob("offline-run-*-offline01"))
    assert len(run_folders) == 1
    assert (run_folders[0] / "run-offline01.wandb").stat().st_size > 0
