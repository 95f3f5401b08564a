"""`lbva model-info`. `register` adds it to the root `lbva` command (launchers/cli.py), which also
holds `lbva train`; `lbva demo` (train, then evaluate) is evaluation/cli.py's."""

from __future__ import annotations

import argparse
from pathlib import Path

from lbva.errors import UserError


def sequence_mix(config):
    """The packed sequences a training config makes, as the FLOPs model counts them (`lbva plan
    --config`, `lbva model-info`)."""
    from lbva.parallelism.flops import SequenceMix

    data, objective = config.data, config.objective
    return SequenceMix(
        token_budget=data.token_budget, window_frames=data.window_frames, text_tokens=data.text_tokens,
        chunk_sizes=tuple(objective.chunk_size), attention_windows=tuple(objective.attention_window),
        forward_dynamics=objective.forward_dynamics_weight > 0, pad_multiple=data.pad_multiple,
    )


def _cmd_model_info(args: argparse.Namespace) -> None:
    from lbva.models.config import PRESETS
    from lbva.models.info import build_on_meta, parameter_counts
    from lbva.parallelism.flops import training_flops_per_token

    from .config import TrainConfig
    from .config_io import load_config

    if args.preset not in PRESETS:
        raise UserError(f"unknown model preset '{args.preset}'; known presets: {', '.join(PRESETS)}")
    train_config = load_config(TrainConfig, args.config, [f"model.preset={args.preset}", *args.overrides])
    config = train_config.model.model_config()
    print(f"{args.preset} (layout {config.layout}, {config.num_layers} layers, {config.num_heads} heads, video width "
          f"{config.video_width}, action width {config.stream_width})")
    for part, count in parameter_counts(build_on_meta(config)).items():
        print(f"  {part:<32} {count:>15,}")
    mix = sequence_mix(train_config)
    flops = training_flops_per_token(config, mix)
    print(f"  {'training FLOPs per token':<32} {flops:>15,.0f}   (forward + backward; {mix.token_budget}-token "
          f"sequences of {mix.window_frames}-frame windows, data.* and objective.* as configured)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `model-info` to the `lbva` subcommands."""
    info = subparsers.add_parser(
        "model-info", help="parameter counts and training FLOPs per token of a model preset",
        description="Parameter counts per part and training FLOPs per token of a preset, with model.width, "
                    "model.heads, model.layers (and data.*, objective.*) overrides, e.g. "
                    "`lbva model-info demo-mot model.width=512 model.layers=6`.")
    info.add_argument("preset")
    info.add_argument("--config", type=Path, default=None, help="TOML config whose data and objective set the mix")
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.layers=8")
    info.set_defaults(func=_cmd_model_info)
