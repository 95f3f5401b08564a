"""`lbva data describe`, `lbva data prepare` (the command line of data preparation), `lbva data
tiny-encoders`, `lbva data index` and `lbva data demo`. `register` adds the `data` group to the root
`lbva` command (launchers/cli.py)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from lbva.training.data.action_slots import slot_table


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from err


def _episode_list(text: str) -> list[int]:
    """"0-9,12" -> [0, ..., 9, 12]: episode numbers and inclusive ranges."""
    numbers = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        first, dash, last = part.partition("-")
        try:
            numbers += list(range(int(first), int(last) + 1)) if dash else [int(part)]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected episode numbers and ranges like 0-9,12, got '{text}'") from err
    return numbers


def _split(text: str) -> tuple[str, float]:
    """"val=0.1" -> ("val", 0.1)."""
    name, sep, fraction = text.partition("=")
    try:
        if sep and name.strip():
            return name.strip(), float(fraction)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NAME=FRACTION such as val=0.1, got '{text}'")


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


class _EpisodesPerSecond(ProgressColumn):
    """The bar's rate column: episodes encoded per second."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} episodes/s" if task.speed else "- episodes/s", style="progress.data.speed")


class _EpisodeBar:
    """prepare's EpisodeProgress as a rich bar on stderr: episodes done of all, episodes/s, ETA."""

    def __init__(self, progress: Progress, source: str) -> None:
        self.progress, self.source, self.task = progress, source, None

    def begin(self, episodes: int) -> None:
        self.task = self.progress.add_task(f"encoding {self.source}", total=episodes)

    def advance(self) -> None:
        self.progress.advance(self.task)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from lbva.models.encoders import EncoderChoice
    from lbva.training.data.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        src=args.src, out=args.out, source=args.source, target_fps=args.target_fps,
        action_channels=args.action_channels, action_map=args.action_map, cameras=args.cameras, layout=args.layout,
        heights=args.height, widths=args.width,
        encoders=EncoderChoice(args.encoders, args.vae, args.text_encoder, args.standin_text_dim),
        episodes=args.episodes, exclude_episodes=args.exclude_episodes, split=args.split,
        task_id=args.task_id, num_tasks=args.num_tasks, workers=args.workers, shard_samples=args.shard_samples,
        on_error=args.on_error, verbose=getattr(args, "verbose", False))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("episodes"),
               _EpisodesPerSecond(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        report = prepare(config, _EpisodeBar(progress, args.source or Path(args.src).resolve().name))
    _print_summary(args, report)


def _print_summary(args: argparse.Namespace, report) -> None:
    """What was prepared, then what to run next: train on it, then evaluate on its held-out episodes."""
    from lbva.models.config import PRESETS

    task = f" (array task {report.task_id} of {report.num_tasks})" if report.num_tasks > 1 else ""
    print(f"{report.source}{task}: {report.shards_written} shards ({report.samples_written} samples) written, "
          f"{report.shards_skipped} already done, {len(report.errors)} bad episodes skipped, "
          f"{report.too_short} segments too short")
    for error in report.errors:
        print(f"  episode {error.episode}: {error.message}")
    sizes = " + ".join(f"{w}x{h}" for h, w in report.camera_sizes)
    print(f"  {report.episodes} episodes planned, cameras {sizes} px at {report.target_fps} fps, "
          f"text embeddings {report.text_dim} wide")
    fraction = 0.0
    if args.split:
        name, fraction = args.split
        print(f"  held out as '{name}' (the action statistics leave them out): episodes "
              f"{', '.join(map(str, report.heldout))}")
    if report.num_tasks > 1:
        return  # the next step waits for the other tasks
    data = [f'data.prepared=["{args.out}"]', f"data.validation_fraction={fraction}", f"run.name={report.source}"]
    fitting = [name for name, model in PRESETS.items() if model.text_dim == report.text_dim]
    if "demo-mot" in fitting:  # the demo recipe's sizes suit a small dataset; one process
        train = ["lbva", "train", "--config", "configs/demo.toml", *data, "parallel.dp_replicate=1"]
    else:
        train = ["lbva", "train", f"model.preset={fitting[0] if fitting else 'PRESET'}", *data]
    print("next (from the repository root; run.steps=N and other overrides as you like):")
    print(f"  {shlex.join(train)}")
    if fraction:
        print(f"  {shlex.join(['lbva', 'eval', f'runs/{report.source}', '--data', str(args.out)])}")


def _cmd_describe(args: argparse.Namespace) -> None:
    from lbva.training.data.describe import describe

    print(describe(args.src))


def _cmd_tiny_encoders(args: argparse.Namespace) -> None:
    from lbva.training.data.tiny_models import write_tiny_encoders

    vae, text = write_tiny_encoders(args.out, args.vocab_from)
    print(f"wrote a tiny Wan2.2 VAE to {vae} and a tiny umT5 (text_dim 32) to {text}")
    print(f"  use: lbva data prepare SRC OUT --encoders real --vae {vae} --text-encoder {text}")


def _cmd_index(args: argparse.Namespace) -> None:
    from lbva.errors import UserError
    from lbva.training.data.index import build_table

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
    """Add `data {describe,prepare,tiny-encoders,index,demo}` to the `lbva` subcommands."""
    data = subparsers.add_parser("data", help="datasets")
    data_subparsers = data.add_subparsers(dest="data_command", required=True)
    describe = data_subparsers.add_parser(
        "describe", help="what a LeRobot folder holds, and the `lbva data prepare` command that fits it",
        description="Print a LeRobot dataset's cameras (resolution, fps), action and state dims with their names, "
                    "episodes, tasks and prompt words, from its metadata, then a suggested `lbva data prepare` "
                    "command with every default spelled out and each action dim mapped to a slot by name.")
    describe.add_argument("src", type=Path, help="LeRobot dataset folder (with meta/info.json)")
    describe.set_defaults(func=_cmd_describe)
    tiny = data_subparsers.add_parser(
        "tiny-encoders", help="write the tiny random Wan2.2 VAE and umT5 that run without model downloads",
        description="Write OUT/vae (a tiny random AutoencoderKLWan of the Wan2.2 latent geometry) and "
                    "OUT/text_encoder (a tiny random umT5, 32 wide, with a word-level tokenizer), for "
                    "`lbva data prepare --encoders real --vae OUT/vae --text-encoder OUT/text_encoder`. They "
                    "are not trained: they make the real encoding path run anywhere, not good features.")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--vocab-from", type=Path, default=None, metavar="SRC",
                      help="LeRobot folder whose prompt words the tokenizer learns (else every word is <unk>) "
                           "and on whose first clips the VAE's latent statistics are computed")
    tiny.set_defaults(func=_cmd_tiny_encoders)
    demo = data_subparsers.add_parser("demo", help="write the procedural pushing-world LeRobot dataset")
    demo.add_argument("out", type=Path)
    demo.add_argument("--episodes", type=int, default=48)
    demo.add_argument("--frames", type=int, default=97, help="raw frames per episode")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    p = data_subparsers.add_parser(
        "prepare", help="encode a local LeRobot v2.1/v3.0 dataset into webdataset shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Encode a LeRobot dataset (v2.1 or v3.0) into the prepared format: webdataset shards of "
                    "VAE latents and normalised actions, an index, text embeddings, action stats and card.json. "
                    "Reruns skip finished shards; Slurm array tasks split the episodes. "
                    "`lbva data describe SRC` suggests the options for a dataset.",
        epilog="The 30 action slots (--action-map NAME=SLOT takes a slot's number or name):\n\n" + slot_table())
    p.add_argument("src", type=Path, help="LeRobot dataset folder (with meta/info.json)")
    p.add_argument("out", type=Path, help="prepared-data folder, shared by sources and tasks")
    p.add_argument("--source", default=None, help="source name (default: the dataset folder's name)")
    p.add_argument("--target-fps", type=int, default=None,
                   help="video rate after sampling; divides the dataset fps (default: its divisor closest to 10)")
    p.add_argument("--action-map", default="", metavar="NAME=SLOT,...",
                   help="the slot of each action dim by the dataset's dim names, e.g. x=left_x,y=left_y,grip=28 "
                        "(slots below)")
    p.add_argument("--action-channels", type=_int_list, default=[], metavar="S0,S1,...",
                   help="instead of --action-map: the slot of each action dim in order, e.g. 0,1,2,3,4,5,6,28 "
                        "(omit both for a video-only source)")
    p.add_argument("--cameras", type=_name_list, default=[], metavar="KEY,...",
                   help="camera keys in tiling order (default: all video features); robotwin_tshape: head first")
    p.add_argument("--layout", choices=("side_by_side", "robotwin_tshape"), default="side_by_side")
    p.add_argument("--height", type=_int_list, default=[], metavar="H[,H...]",
                   help="pixel height, one for all cameras or one per camera (tshape: the head's); default: each "
                        "camera's own size, scaled down to at most 256 px and to multiples of 32")
    p.add_argument("--width", type=_int_list, default=[], metavar="W[,W...]", help="pixel width, as --height")
    p.add_argument("--episodes", type=_episode_list, default=[], metavar="0-9,12",
                   help="prepare only these episodes (numbers and ranges; default: all)")
    p.add_argument("--exclude-episodes", type=_episode_list, default=[], metavar="0-9,12",
                   help="leave these episodes out")
    p.add_argument("--split", type=_split, default=None, metavar="NAME=FRACTION",
                   help="hold out this fraction of the episodes as NAME: the action statistics leave them out, and "
                        "training with data.validation_fraction=FRACTION validates on exactly them")
    p.add_argument("--encoders", choices=("real", "standin"), default="real",
                   help="real: Wan2.2 VAE + umT5 from --vae/--text-encoder; standin: light deterministic stand-ins")
    p.add_argument("--vae", type=Path, default=None, help="AutoencoderKLWan folder (or a Wan2.2 root with vae/)")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="umT5 folder with tokenizer and model (or a root with tokenizer/ and text_encoder/)")
    p.add_argument("--standin-text-dim", type=int, default=4096,
                   help="embedding width of the stand-in text encoder (the model's text_dim)")
    p.add_argument("--task-id", type=int, default=_slurm_array("SLURM_ARRAY_TASK_ID", 0),
                   help="this Slurm array task's number (default: from SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, default=_slurm_array("SLURM_ARRAY_TASK_COUNT", 1),
                   help="array tasks sharing the episodes, the i-th going to array task i %% n (default: "
                        "SLURM_ARRAY_TASK_COUNT)")
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
