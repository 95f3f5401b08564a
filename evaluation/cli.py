"""`lbva eval CHECKPOINT --data PREPARED` (run.py) and `lbva demo` (training/demo.py, then the
evaluation of the trained demo model). `register` adds them to the root command."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lbva.errors import UserError


def _cmd_eval(args: argparse.Namespace) -> None:
    from lbva.inference.settings import InferenceSettings

    from .run import EvalOptions, evaluate

    sweep = len(args.video_guidance) > 1
    summaries = []
    for guidance in args.video_guidance:
        settings = InferenceSettings(chunk_size=args.chunk_size, video_steps=args.video_steps,
                                     action_steps=args.action_steps, video_guidance=guidance,
                                     action_guidance=args.action_guidance)
        if args.point_draws < 1:
            raise UserError(f"lbva eval: --point-draws must be >= 1, got {args.point_draws}")
        options = EvalOptions(samples_per_source=args.samples, rollout_chunks=args.rollout_chunks,
                              pictures_per_source=args.pictures, point_draws=args.point_draws, settings=settings,
                              ema=args.ema, vae=args.vae)
        out = args.out / f"video_guidance_{guidance:g}" if sweep and args.out is not None else args.out
        if sweep and out is None:
            raise UserError("lbva eval: several --video-guidance values need --out (one folder per value in it)")
        summary = evaluate(args.checkpoint, args.data, out, options, seed=args.seed)
        if "pictures" in summary:  # the writing rank
            _print_summary(summary, Path(summary["out"]))
            summaries.append((guidance, summary))
    if sweep and summaries:
        print(guidance_table(summaries), end="")


SWEPT = ("video_mse", "video_mse_sampled", "video_mse_rollout", "action_mse", "action_mse_sampled")


def guidance_table(summaries: list[tuple[float, dict]]) -> str:
    """One row per video guidance scale: the metrics that guidance moves (lower is better)."""
    lines = ["| video guidance | " + " | ".join(SWEPT) + " |", "|---:|" + "---:|" * len(SWEPT)]
    for guidance, summary in summaries:
        lines.append(f"| {guidance:g} | " + " | ".join(f"{summary[key]:.4f}" for key in SWEPT) + " |")
    return "\n".join(lines) + "\n"


def _print_summary(summary: dict, out: Path) -> None:
    from .run import markdown_table

    print(markdown_table(summary), end="")
    shown = [p for p in summary["pictures"] if p.endswith(".png")]
    print(f"summary: {out / 'summary.json'}; pictures: {', '.join(shown) if shown else 'none (no decoder for this data)'}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from lbva.training.config import DEMO_BASE, TrainConfig
    from lbva.training.config_io import load_config
    from lbva.training.demo import run_demo

    from .run import evaluate

    config = load_config(TrainConfig, args.config, args.overrides, base=DEMO_BASE)
    started = time.perf_counter()
    eval_losses = run_demo(config, args.episodes, args.frames)
    steps = sorted(eval_losses)
    first, last = eval_losses[steps[0]], eval_losses[steps[-1]]
    run_dir = config.run.output_dir / config.run.name
    print(f"trained in {time.perf_counter() - started:.0f} s: validation loss {first:.4f} at step {steps[0]} -> "
          f"{last:.4f} at step {steps[-1]} ({last / first:.2f}x); artifacts in {run_dir}")
    print("evaluating the world model on the held-out episodes (lbva eval)")
    summary = evaluate(run_dir, list(config.data.prepared))
    _print_summary(summary, run_dir / "eval")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")


def register(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "eval", help="score a checkpoint's world model on held-out episodes: imagined video, inverse "
                     "dynamics and flow-matching loss against baselines, with pictures")
    command.add_argument("checkpoint", type=Path, help="a committed checkpoint folder, or a run folder (its newest)")
    command.add_argument("--data", type=Path, action="append", required=True, help="prepared dataset folder(s)")
    command.add_argument("--out", type=Path, default=None, help="output folder (default RUN/eval)")
    command.add_argument("--samples", type=int, default=8, help="held-out samples per source")
    command.add_argument("--rollout-chunks", type=int, default=4, help="chunks of the open-loop rollout")
    command.add_argument("--pictures", type=int, default=2, help="rollouts drawn per source")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--point-draws", type=int, default=8,
                         help="noise draws averaged into each point prediction (the conditional mean)")
    command.add_argument("--chunk-size", type=int, default=4, help="latent frames per chunk (K)")
    command.add_argument("--video-steps", type=int, default=10)
    command.add_argument("--action-steps", type=int, default=10)
    command.add_argument("--video-guidance", type=float, nargs="+", default=[1.0],
                         help="1 = none: the mean squared error favours the conditional mean; several values "
                              "sweep them (one folder each under --out, and a table comparing them)")
    command.add_argument("--action-guidance", type=float, default=1.0)
    command.add_argument("--ema", action="store_true", help="score the EMA weights")
    command.add_argument("--vae", type=Path, default=None,
                         help="the Wan2.2 VAE folder, to draw pictures of data prepared with it")
    command.set_defaults(func=_cmd_eval)

    demo = subparsers.add_parser("demo", help="generate and prepare the demo dataset if missing, train the demo "
                                              "config, then evaluate it on the held-out episodes")
    demo.add_argument("--config", type=Path, default=None, help="TOML config file")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=3e-4 run.steps=100")
    demo.add_argument("--episodes", type=int, default=48)
    demo.add_argument("--frames", type=int, default=97, help="raw frames per episode")
    demo.set_defaults(func=_cmd_demo)
