"""The embedded demo, end to end on the real data path with tiny random encoders:

generated LeRobot v2.1 pushing world -> tiny Wan2.2-geometry VAE + tiny umT5 (random, seeded) ->
`lbva data prepare` shards -> training of the demo-mot preset (config DEMO_BASE) on two processes
(FSDP dp_shard 2, gloo on CPU).
Every stage is skipped when its output exists, so a second `lbva demo` only trains.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from lbva.models.encoders import EncoderChoice

from .config import TrainConfig
from .config_io import dump_toml
from .data.demo_world import GOAL_DIRECTIONS, generate_demo_dataset, simulate_episode
from .data.prepare import PrepareConfig, prepare
from .data.tiny_models import write_tiny_umt5, write_tiny_wan_vae
from lbva.errors import UserError
from .metrics import read_metrics
from .trainer import train

DEMO_WORDS = "push the red green blue block to left right top bottom".split()


def prepare_demo_data(config: TrainConfig, root: Path, episodes: int, frames: int, console: Console) -> None:
    """Generate, encode and shard the demo dataset into config.data.prepared[0] unless it exists."""
    prepared = config.data.prepared[0]
    lerobot, vae, umt5 = root / "demo-lerobot", root / "demo-models" / "vae", root / "demo-models" / "umt5"
    if not (lerobot / "meta" / "info.json").exists():
        console.print(f"generating the pushing world: {episodes} episodes -> {lerobot}")
        generate_demo_dataset(lerobot, num_episodes=episodes, frames_per_episode=frames, seed=0)
    if not (vae / "config.json").exists():
        write_tiny_wan_vae(vae, calibration_clips=calibration_clips(frames))
    if not (umt5 / "config.json").exists():
        write_tiny_umt5(umt5, DEMO_WORDS + list(GOAL_DIRECTIONS), d_model=32)
    if not (prepared / "card.json").exists():
        console.print(f"preparing shards with the tiny VAE and umT5 -> {prepared}")
        report = prepare(PrepareConfig(
            src=lerobot, out=prepared, source="pusher", target_fps=config.data.target_fps, action_channels=[0, 1],
            heights=[128], widths=[128], encoders=EncoderChoice("real", vae=vae, text_encoder=umt5), workers=2,
        ))
        console.print(f"prepared {report.samples_written} samples in {report.shards_written} shard(s)")


def calibration_clips(frames: int, count: int = 8) -> list[np.ndarray]:
    """Clips of the pushing world (episodes of their own seed, not the dataset's) on which the tiny
    VAE's latent statistics are computed: 1 + 4k frames each, at most `frames`."""
    rng = np.random.default_rng(12345)
    length = 1 + 4 * ((min(frames, 33) - 1) // 4)
    return [simulate_episode(rng, length).frames for _ in range(count)]


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
    return {r["step"]: r["loss_eval"] for r in read_metrics(run_dir / "metrics.jsonl")}
