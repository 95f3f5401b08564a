"""`lbva model-info`. `register` adds it to the root `lbva` command (launchers/cli.py), which also
holds `lbva train`; `lbva demo` (train, then evaluate) is evaluation/cli.py's."""

from __future__ import annotations

import argparse

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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `model-info` to the `lbva` subcommands."""
    info = subparsers.add_parser("model-info", help="parameter counts of a model preset")
    info.add_argument("preset")
    info.set_defaults(func=_cmd_model_info)
