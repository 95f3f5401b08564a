"""`lbva model-info` and `lbva demo`. `register` adds them to the root `lbva` command
(launchers/cli.py), which also holds `lbva train`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lbva.errors import UserError


def _cmd_model_info(args: argparse.Namespace) -> None:
    from lbva.models.config import PRESETS, get_preset
    from lbva.models.info import build_on_meta, parameter_counts

    if args.preset not in PRESETS:
        raise UserError(f"unknown model preset '{args.preset}'; known presets: {', '.join(PRESETS)}")
    config = get_preset(args.preset)
    print(f"{args.preset} (layout {config.layout}, {config.num_layers} layers, video width {config.video_width}, "
          f"action width {config.stream_width})")
    for part, count in parameter_counts(build_on_meta(config)).items():
        print(f"  {part:<32} {count:>15,}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .config import DEMO_BASE, TrainConfig
    from .config_io import load_config
    from .demo import run_demo

    config = load_config(TrainConfig, args.config, args.overrides, base=DEMO_BASE)
    started = time.perf_counter()
    eval_losses = run_demo(config, args.episodes, args.frames)
    steps = sorted(eval_losses)
    first, last = eval_losses[steps[0]], eval_losses[steps[-1]]
    print(f"demo finished in {time.perf_counter() - started:.0f} s: eval loss {first:.4f} at step {steps[0]} -> "
          f"{last:.4f} at step {steps[-1]} ({last / first:.2f}x); artifacts in "
          f"{config.run.output_dir / config.run.name}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `model-info` and `demo` to the `lbva` subcommands."""
    info = subparsers.add_parser("model-info", help="parameter counts of a model preset")
    info.add_argument("preset")
    info.set_defaults(func=_cmd_model_info)

    demo = subparsers.add_parser("demo", help="generate the demo dataset if missing, then train the demo config")
    demo.add_argument("--config", type=Path, default=None, help="TOML config file")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=3e-4 run.steps=100")
    demo.add_argument("--episodes", type=int, default=48)
    demo.add_argument("--frames", type=int, default=97, help="raw frames per episode")
    demo.set_defaults(func=_cmd_demo)
