"""bench/gpu_check.py: its CPU dry run (issue #13 item 4) keeps the GPU check from rotting between
GPU runs, and it imports on the GPU image, which has only torch, numpy and safetensors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = {"tests", "attention", "step", "fp8", "inference"}
# Packages the GPU image lacks (docs/gpu_check.md): none may be needed to import the check.
ABSENT_ON_GPU_IMAGE = ("diffusers", "webdataset", "submitit", "wandb", "deepspeed", "torchao", "av")


def _numbers(value):
    """Every int/float inside a JSON value (bools excluded)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_cpu_dry_run_reports_every_part_with_finite_figures(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert set(report["parts"]) == PARTS
    errors = {name: part["error"] for name, part in report["parts"].items() if "error" in part}
    assert errors == {}
    assert report["parts"]["tests"]["returncode"] == 0, report["parts"]["tests"]["summary"]
    attention = report["parts"]["attention"]
    assert attention["max_abs_error"] < 1e-4
    assert attention["ms"].keys() == {"flex", "dense_sdpa", "causal_sdpa"}
    step = report["parts"]["step"]
    assert step["tokens_per_s"] > 0 and step["predicted_peak_gib"] > 0
    assert "skipped" in report["parts"]["fp8"]
    inference = report["parts"]["inference"]
    assert inference["sync_chunk_ms"] > 0 and inference["async_chunk_ms"] > 0 and inference["kv_cache_gib"] > 0
    assert all(math.isfinite(x) for x in _numbers(report))
    table = out.with_suffix(".md").read_text()
    assert "| part | figure | value |" in table and "| step | tokens_per_s |" in table


# Every runtime dependency of pyproject.toml but torch, numpy and safetensors, and the extras.
OPTIONAL = ABSENT_ON_GPU_IMAGE + ("pyarrow", "rich", "matplotlib", "websockets", "msgpack", "transformers", "pytest")

BLOCKER = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
sys.meta_path.insert(0, Absent())
sys.path.insert(0, {bench!r})
import {modules}
print("imported")
"""


def _imports_with(blocked: tuple[str, ...], modules: str) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=set(blocked), bench=str(ROOT / "bench"), modules=modules)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_check_imports_with_only_torch_numpy_and_safetensors():
    done = _imports_with(OPTIONAL, "gpu_check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_what_the_parts_run_imports_without_the_packages_the_gpu_image_lacks():
    done = _imports_with(ABSENT_ON_GPU_IMAGE, "step_throughput, inference_latency, lbva.training.trainer, "
                                             "lbva.inference.runtime, lbva.parallelism.fp8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def _gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_check


def test_a_failing_part_records_its_error_and_the_check_goes_on():
    gpu_check = _gpu_check()

    def broken():
        raise RuntimeError("out of memory")

    result = gpu_check.guarded("broken", broken)
    assert result["error"] == "RuntimeError: out of memory"
    assert result["seconds"] >= 0
    assert "| broken | error | RuntimeError: out of memory |" in gpu_check.markdown_table(
        {"device": "cpu", "size": "tiny", "torch": "x", "parts": {"broken": result}})


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert _gpu_check().main(["--device", "cpu", "--tiny", "--parts", "step,flash", "--json", str(out)]) == 2
    assert "unknown parts ['flash']" in capsys.readouterr().err
    assert not out.exists()
