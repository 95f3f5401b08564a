"""The `lbva` command line. User mistakes end as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .distributed import world_from_env
from lbva.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        raise UserError(f"{self.prog}: {message}")


def _cmd_model_info(args) -> None:
    from lbva.models.config import PRESETS, get_preset
    from lbva.models.info import build_on_meta, parameter_counts

    if args.preset not in PRESETS:
        raise UserError(f"unknown model preset '{args.preset}'; known presets: {', '.join(PRESETS)}")
    config = get_preset(args.preset)
    print(f"{args.preset} (layout {config.layout}, {config.num_layers} layers, video width {config.video_width}, "
          f"action width {config.stream_width})")
    for part, count in parameter_counts(build_on_meta(config)).items():
        print(f"  {part:<32} {count:>15,}")


def _load_train_config(args, base: dict | None = None):
    from .config import TrainConfig
    from .config_io import load_config

    return load_config(TrainConfig, args.config, args.overrides, base=base)


def _cmd_train(args) -> None:
    config = _load_train_config(args)
    from .trainer import train

    result = train(config)
    if world_from_env().rank == 0:
        print(f"run finished: {result.run_dir} ({result.steps} steps, {result.seconds:.0f} s)")


def _cmd_demo(args) -> None:
    from .config import DEMO_BASE
    from .demo import run_demo

    config = _load_train_config(args, base=DEMO_BASE)
    started = time.perf_counter()
    eval_losses = run_demo(config, args.episodes, args.frames)
    steps = sorted(eval_losses)
    first, last = eval_losses[steps[0]], eval_losses[steps[-1]]
    print(f"demo finished in {time.perf_counter() - started:.0f} s: eval loss {first:.4f} at step {steps[0]} -> "
          f"{last:.4f} at step {steps[-1]} ({last / first:.2f}x); artifacts in "
          f"{config.run.output_dir / config.run.name}")


def _cmd_data_demo(args) -> None:
    from .demo_world import generate_demo_dataset

    generate_demo_dataset(args.out, num_episodes=args.episodes, frames_per_episode=args.frames, seed=args.seed)
    print(f"wrote a LeRobot v2.1 demo dataset with {args.episodes} episodes to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lbva", description="Pretraining of LingBot-VA video-action world models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = commands.add_parser("model-info", help="parameter counts of a model preset")
    info.add_argument("preset")
    info.set_defaults(func=_cmd_model_info)

    for name, func, text in (
        ("train", _cmd_train, "train from a TOML config plus KEY=VALUE overrides"),
        ("demo", _cmd_demo, "generate the demo dataset if missing, then train the demo config"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, default=None, help="TOML config file")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=3e-4 run.steps=100")
        sub.set_defaults(func=func)
        if name == "demo":
            sub.add_argument("--episodes", type=int, default=48)
            sub.add_argument("--frames", type=int, default=97, help="raw frames per episode")

    data = commands.add_parser("data", help="datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    demo_data = data_commands.add_parser("demo", help="write the procedural pushing-world LeRobot dataset")
    demo_data.add_argument("out", type=Path)
    demo_data.add_argument("--episodes", type=int, default=48)
    demo_data.add_argument("--frames", type=int, default=97, help="raw frames per episode")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(func=_cmd_data_demo)
    from .data.cli import register as register_prepare

    register_prepare(data_commands)

    from lbva.checkpoints_tools.cli import register as register_checkpoint_commands
    from lbva.parallelism.plan import register as register_plan

    register_plan(commands)
    from lbva.launchers.cli import register as register_launch_commands

    register_launch_commands(commands, _Parser)
    from lbva.inference.cli import register_serve

    register_serve(commands, _Parser)

    register_checkpoint_commands(commands, _Parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as error:
        print(f"lbva: error: {error}", file=sys.stderr)
        return 2
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
