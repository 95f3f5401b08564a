"""Shipped configs load, and the demo file says what the embedded demo runs."""

from pathlib import Path

from lbva.training.config import DEMO_BASE, TrainConfig
from lbva.training.config_io import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_demo_file_equals_the_embedded_demo():
    assert load_config(TrainConfig, CONFIGS / "demo.toml") == load_config(TrainConfig, base=DEMO_BASE)


def test_every_shipped_config_loads():
    for path in CONFIGS.glob("*.toml"):
        load_config(TrainConfig, path)
