"""The embedded demo, end to end on the real data path:

generated LeRobot v2.1 pushing world -> stand-in encoders (the Wan2.2 latent geometry by fixed
pooling, which decodes back to recognisable frames, so the evaluation's pictures show the world) ->
`lbva data prepare` shards -> training of the demo-mot preset (config DEMO_BASE) on two processes
(FSDP dp_shard 2, gloo on CPU). `lbva demo` then evaluates the result (evaluation/).
Every stage is skipped when its output exists, so a second `lbva demo` only trains.

The tiny random Wan2.2 VAE and umT5 (data/tiny_models.py) run the real diffusers / transformers
path in the tests; a random VAE is not a codec, so the demo's pictures could not be decoded from it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

from lbva.models.encoders import EncoderChoice

from .config import TrainConfig
from .config_io import dump_toml
from .data.demo_world import generate_demo_dataset
from .data.prepare import PrepareConfig, prepare
from lbva.errors import UserError
from .metrics import read_metrics
from .trainer import train

DEMO_TEXT_DIM = 32  # the demo-mot preset's text_dim


def prepare_demo_data(config: TrainConfig, root: Path, episodes: int, frames: int, console: Console) -> None:
    """Generate, encode and shard the demo dataset into config.data.prepared[0] unless it exists."""
    prepared = config.data.prepared[0]
    lerobot = root / "demo-lerobot"
    if not (lerobot / "meta" / "info.json").exists():
        console.print(f"generating the pushing world: {episodes} episodes -> {lerobot}")
        generate_demo_dataset(lerobot, num_episodes=episodes, frames_per_episode=frames, seed=0)
    if not (prepared / "card.json").exists():
        console.print(f"preparing shards with the stand-in encoders -> {prepared}")
        report = prepare(PrepareConfig(
            src=lerobot, out=prepared, source="pusher", target_fps=config.data.target_fps, action_channels=[0, 1],
            heights=[128], widths=[128], encoders=EncoderChoice("standin", standin_text_dim=DEMO_TEXT_DIM), workers=2,
        ))
        console.print(f"prepared {report.samples_written} samples in {report.shards_written} shard(s)")


def world_size_of(config: TrainConfig) -> int:
    p = config.parallel
    return p.pp * p.dp_replicate * max(p.dp_shard, 1) * p.cp * p.tp


def run_demo(config: TrainConfig, episodes: int, frames: int, console: Console | None = None) -> dict[int, float]:
    """Prepare the demo data, then train: in this process for a one-process layout, else under
    torchrun (standalone, one process per rank) with the resolved config. Returns the evaluation
    loss per logged step."""
    console = console or Console()
    prepare_demo_data(config, config.run.output_dir, episodes, frames, console)
    nproc = world_size_of(config)
    if nproc == 1:
        return train(config, console).eval_losses
    run_dir = config.run.output_dir / config.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    launch_config = run_dir / "launch.toml"
    dump_toml(config, launch_config)
    console.print(f"launching {nproc} processes: torchrun --standalone --nproc-per-node {nproc} lbva train")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "lbva.launchers.cli", "train", "--config", str(launch_config)]
    if subprocess.run(command).returncode != 0:
        raise UserError(f"the demo's training processes failed; see the output above and {run_dir}")
    # Only the records of an evaluated step carry loss_eval (run.eval_every).
    return {r["step"]: r["loss_eval"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss_eval" in r}
