"""bench/inference_latency.py serves a tiny exported model and drives sync and async episodes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "inference_latency.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("inference_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_steady_throughput_counts_chunk_starts_and_leaves_out_the_last_chunk():
    episode = _script_module().Episode(starts=[0.0, 1.0, 2.5, 3.0, 4.5], end=6.0, latencies=[0.2, 0.4, 0.6])
    assert episode.chunks_per_s() == pytest.approx(5 / 6.0)
    assert episode.steady_chunks_per_s(1) == pytest.approx(3 / 3.5)  # starts of chunks 1..4, not the last end
    assert episode.steady_latency() == pytest.approx(0.5)  # the second half: 0.4 and 0.6


def test_a_tiny_model_runs_every_figure_and_reports_them_consistently():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny-mot", "--image-size", "32", "--chunks", "6", "--repeats", "1",
         "--video-steps", "2", "--action-steps", "2", "--threads", "1", "--attention-window", "4",
         "--text-tokens", "64", "--sessions", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    chunk, sessions, prediction = figures["chunk"], figures["sessions"], figures["prediction"]
    assert chunk["text_tokens"] == 64 and chunk["full_ms"] > 0 and chunk["shortcuts_ms"] > 0
    assert sessions["sessions"] == 2 and sessions["one_actions_per_s"] > 0
    assert sessions["ratio"] == pytest.approx(sessions["many_actions_per_s"] / sessions["one_actions_per_s"])
    assert sessions["scheduling"] in ("one request at a time", "up to 2 requests at once")
    for name in ("one_at_a_time", "parallel", "batched"):
        assert prediction[f"{name}_chunks_per_s"] > 0
    assert prediction["forwards_per_call"] > 1  # the two sessions' forwards shared model calls
    rows = {row["robot_time"]: row for row in figures["async"]}
    assert set(rows) == {"1 x P_sync", "P_async"}
    at_sync, balanced = rows["1 x P_sync"], rows["P_async"]
    assert at_sync["exec_ms"] == pytest.approx(at_sync["p_sync_ms"])
    assert balanced["exec_ms"] == pytest.approx(balanced["p_async_ms"])
    for row in rows.values():
        e, p_sync, p_async = row["exec_ms"], row["p_sync_ms"], row["p_async_ms"]
        assert row["bound_ratio"] == pytest.approx((e + p_sync) / max(e, p_async))
        assert row["steady_ratio"] == pytest.approx(row["async_actions_per_s"] / row["sync_actions_per_s"])
