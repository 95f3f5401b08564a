"""What a pretraining team reads besides the losses: step time, data wait, memory, model TFLOP/s;
and a profiler trace on demand."""

import json

from rich.console import Console

from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.training.config import TrainConfig
from lbva.training.config_io import load_config
from lbva.training.metrics import read_metrics
from lbva.training.trainer import train

from helpers import prepared_demo
import pytest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_demo(tmp_path_factory.mktemp("data"), num_episodes=4, frames_per_episode=49, image_size=64, seed=1)


def _config(dataset, out, *overrides):
    return load_config(TrainConfig, overrides=[
        "model.preset=tiny-mot", f"data.prepared=['{dataset}']", f"run.output_dir={out}", "data.text_tokens=8",
        "data.window_frames=8", "data.token_budget=512", "data.pad_multiple=32", "run.name=m", *overrides,
    ])


def test_each_logged_step_carries_throughput_memory_and_model_flops(dataset, tmp_path):
    train(_config(dataset, tmp_path, "run.steps=4", "run.log_every=2"), Console(quiet=True))
    records = read_metrics(tmp_path / "m" / "metrics.jsonl")
    for record in records:
        assert record["step_s"] > 0 and record["data_wait_s"] >= 0 and record["mem_gib"] > 0.05
        assert "mfu" not in record  # no peak is known for a CPU
    # TFLOP/s per GPU is one FLOPs-per-token figure times the logged token rate, and that figure is
    # a training step's: about 6 FLOPs per parameter and token, more with attention.
    per_token = [r["tflops_per_gpu"] * 1e12 / r["tokens_per_s"] for r in records]
    assert per_token[0] == pytest.approx(per_token[-1], rel=1e-9)
    parameters = sum(p.numel() for p in LingBotVA(get_preset("tiny-mot")).parameters())
    assert 2 * parameters < per_token[0] < 30 * parameters


def test_profile_steps_write_a_chrome_trace_of_those_steps(dataset, tmp_path):
    train(_config(dataset, tmp_path, "run.steps=4", "run.log_every=2", "run.profile_steps=[2, 3]"),
          Console(quiet=True))
    traces = list((tmp_path / "m" / "profile").glob("trace_steps_2-3.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::" in str(event.get("name", "")) for event in events)


def test_no_profile_is_written_unless_asked(dataset, tmp_path):
    train(_config(dataset, tmp_path, "run.steps=2", "run.log_every=2"), Console(quiet=True))
    assert not (tmp_path / "m" / "profile").exists()
