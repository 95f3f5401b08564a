"""bench/step_throughput.py runs end to end on the CPU and writes its JSON summary."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lbva.models.config import get_preset
from lbva.parallelism.flops import SequenceMix, training_flops_per_token

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "step_throughput.py"


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)


def test_two_cpu_steps_of_tiny_mot_write_the_summary(tmp_path):
    out = tmp_path / "summary.json"
    result = _run("--device", "cpu", "--preset", "tiny-mot", "--steps", "2", "--warmup", "0", "--token-budget", "576",
                  "--peak-tflops", "0.5", "--json", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert summary["preset"] == "tiny-mot" and summary["device"] == "cpu" and summary["attention"] == "sdpa"
    assert len(summary["step_seconds"]) == 2 and all(s > 0 for s in summary["step_seconds"])
    mix = SequenceMix(token_budget=576, video_tokens_per_frame=64, actions_per_frame=8, text_tokens=16)
    assert summary["tokens_per_step"] == mix.tokens
    assert summary["flops_per_token"] == pytest.approx(training_flops_per_token(get_preset("tiny-mot"), mix))
    assert summary["tokens_per_s"] == pytest.approx(mix.tokens / summary["median_step_s"])
    assert summary["mfu"] == pytest.approx(summary["achieved_tflops"] / 0.5)
    assert "MFU" in result.stdout and "tokens/s" in result.stdout


def _script_module():
    """The script imported in this process: the checks below need no second interpreter start."""
    spec = importlib.util.spec_from_file_location("step_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_depth_cut_is_stated_in_the_output(capsys):
    argv = ["--device", "cpu", "--preset", "demo-mot", "--layers", "1", "--steps", "1", "--warmup", "0",
            "--token-budget", "576"]
    assert _script_module().main(argv) == 0
    assert "depth cut to 1 of 4 layers" in capsys.readouterr().out


def test_fp8_on_the_cpu_is_refused_with_status_2(capsys):
    assert _script_module().main(["--device", "cpu", "--precision", "fp8"]) == 2
    assert "--precision fp8 needs a CUDA GPU" in capsys.readouterr().err
