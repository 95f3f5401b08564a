"""`lbva data prepare` (the command line of data preparation), `lbva data index` and `lbva data demo`.
`register` adds the `data` group to the root `lbva` command (launchers/cli.py)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from err


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _slurm_array(name: str, default: int) -> int:
    """A Slurm array variable; task ids count from SLURM_ARRAY_TASK_MIN so `--array=1-8` works too."""
    value = os.environ.get(name)
    if value is None:
        return default
    if name == "SLURM_ARRAY_TASK_ID":
        return int(value) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    return int(value)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from lbva.models.encoders import EncoderChoice
    from lbva.training.data.prepare import PrepareConfig, prepare

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = prepare(PrepareConfig(
        src=args.src, out=args.out, source=args.source, target_fps=args.target_fps,
        action_channels=args.action_channels, cameras=args.cameras, layout=args.layout, heights=args.height,
        widths=args.width, encoders=EncoderChoice(args.encoders, args.vae, args.text_encoder, args.standin_text_dim),
        task_id=args.task_id, num_tasks=args.num_tasks, workers=args.workers, shard_samples=args.shard_samples,
        on_error=args.on_error))
    print(f"{report.source} task {report.task_id}/{report.num_tasks}: {report.shards_written} shards "
          f"({report.samples_written} samples) written, {report.shards_skipped} already done, "
          f"{len(report.errors)} bad episodes skipped, {report.too_short} segments too short")
    for error in report.errors:
        print(f"  episode {error.episode}: {error.message}")


def _cmd_index(args: argparse.Namespace) -> None:
    from lbva.errors import UserError
    from lbva.training.data.index import build_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    folder = args.prepared / "index"
    sources = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not sources:
        raise UserError(f"data index: {args.prepared} has no index/SOURCE/ folder; is it a prepared dataset?")
    for source in sources:
        table = build_table(args.prepared, source, scan_shards=True)
        located = int((table.columns["offset"] >= 0).sum())
        print(f"{source}: {len(table)} samples in {len(table.shards)} shards, {located} with byte ranges, "
              f"{len(table.problems)} bad lines, fingerprint {table.fingerprint}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo_world import generate_demo_dataset

    generate_demo_dataset(args.out, num_episodes=args.episodes, frames_per_episode=args.frames, seed=args.seed)
    print(f"wrote a LeRobot v2.1 demo dataset with {args.episodes} episodes to {args.out}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data {prepare,index,demo}` to the `lbva` subcommands."""
    data = subparsers.add_parser("data", help="datasets")
    data_subparsers = data.add_subparsers(dest="data_command", required=True)
    demo = data_subparsers.add_parser("demo", help="write the procedural pushing-world LeRobot dataset")
    demo.add_argument("out", type=Path)
    demo.add_argument("--episodes", type=int, default=48)
    demo.add_argument("--frames", type=int, default=97, help="raw frames per episode")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    p = data_subparsers.add_parser(
        "prepare", help="encode a local LeRobot v2.1/v3.0 dataset into webdataset shards",
        description="Encode a LeRobot dataset (v2.1 or v3.0) into the prepared format: webdataset shards of "
                    "VAE latents and normalised actions, an index, text embeddings, action stats and card.json. "
                    "Reruns skip finished shards; Slurm array tasks split the episodes.")
    p.add_argument("src", type=Path, help="LeRobot dataset folder (with meta/info.json)")
    p.add_argument("out", type=Path, help="prepared-data folder, shared by sources and tasks")
    p.add_argument("--source", default=None, help="source name (default: the dataset folder's name)")
    p.add_argument("--target-fps", type=int, default=10, help="video rate after sampling; divides the dataset fps")
    p.add_argument("--action-channels", type=_int_list, default=[], metavar="S0,S1,...",
                   help="30-d slot of each dataset action dim, e.g. 0,1,2,3,4,5,6,28 (omit for a video-only source)")
    p.add_argument("--cameras", type=_name_list, default=[], metavar="KEY,...",
                   help="camera keys in tiling order (default: all video features); robotwin_tshape: head first")
    p.add_argument("--layout", choices=("side_by_side", "robotwin_tshape"), default="side_by_side")
    p.add_argument("--height", type=_int_list, default=[256], metavar="H[,H...]",
                   help="pixel height, one for all cameras or one per camera (tshape: the head's)")
    p.add_argument("--width", type=_int_list, default=[256], metavar="W[,W...]", help="pixel width, as --height")
    p.add_argument("--encoders", choices=("real", "standin"), default="real",
                   help="real: Wan2.2 VAE + umT5 from --vae/--text-encoder; standin: light deterministic stand-ins")
    p.add_argument("--vae", type=Path, default=None, help="AutoencoderKLWan folder (or a Wan2.2 root with vae/)")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="umT5 folder with tokenizer and model (or a root with tokenizer/ and text_encoder/)")
    p.add_argument("--standin-text-dim", type=int, default=4096,
                   help="embedding width of the stand-in text encoder (the model's text_dim)")
    p.add_argument("--task-id", type=int, default=_slurm_array("SLURM_ARRAY_TASK_ID", 0),
                   help="this task's number (default: from SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, default=_slurm_array("SLURM_ARRAY_TASK_COUNT", 1),
                   help="tasks sharing the episodes, episode i going to task i %% n (default: SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes decoding and encoding episodes (CPU nodes: several; one GPU: 1)")
    p.add_argument("--shard-samples", type=int, default=256, help="samples per shard (whole episodes per shard)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="bad episodes: log and skip them, or stop with an error")
    p.set_defaults(func=_cmd_prepare)

    index = data_subparsers.add_parser(
        "index", help="rebuild the columnar index (index/SOURCE/columns.idx) of a prepared dataset",
        description="Build each source's columnar index from its jsonl lines, so that every rank and loader "
                    "worker memory-maps it at start-up instead of parsing them. `lbva data prepare` writes it "
                    "itself; run this for a dataset prepared before it did, or after editing the jsonl lines. "
                    "Samples whose lines lack byte ranges get them from their shards' tar headers.")
    index.add_argument("prepared", type=Path, help="prepared-data folder (with index/ and shards/)")
    index.set_defaults(func=_cmd_index)
