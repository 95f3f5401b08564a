"""How long a checkpoint save blocks training: asynchronous (staged to CPU, written in the
background) against synchronous, for the same training state, measured in one run.

    python bench/checkpoint_blocking.py --preset demo-mot --repeats 5 [--layers N --width W]

An asynchronous save blocks for `save` plus, where staging runs in the background (CUDA), the
wait of the next optimizer step for it (`finish_staging`, taken here right after `save`: the worst
case). The first asynchronous save also allocates the manager's staging buffers; later saves reuse
them, so it is reported apart and the ratio uses the median of the later ones.
Prints the blocking times and their ratio (goal: async <= 10% of sync).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lbva.checkpoints_tools.manager import CheckpointManager, RetentionPolicy
from lbva.checkpoints_tools.train_state import TrainState
from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.training.config import OptimConfig
from lbva.training.optim import build_optimizer, build_scheduler


class _NoStream:
    def state_dict(self) -> dict:
        return {"position": 0}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_state(preset: str, overrides: dict) -> TrainState:
    model = LingBotVA(get_preset(preset, **overrides))
    optimizer = build_optimizer(model, OptimConfig())
    for param in model.parameters():  # populate AdamW moments so the optimizer state is full size
        param.grad = torch.zeros_like(param)
    optimizer.step()
    return TrainState(model, optimizer, build_scheduler(optimizer, 100, OptimConfig()), _NoStream())


def blocking_seconds(state: TrainState, async_save: bool, repeats: int, root: Path) -> list[float]:
    manager = CheckpointManager(root, RetentionPolicy(keep_last=1), async_save=async_save)
    times = []
    for step in range(1, repeats + 1):
        manager.wait()  # the previous write is not part of this save's blocking time
        started = time.perf_counter()
        manager.save(step, {"train": state}, {"model": {}})
        manager.finish_staging()
        times.append(time.perf_counter() - started)
    manager.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo-mot")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers")
    parser.add_argument("--width", type=int, default=None, help="override head_dim (width = heads x head_dim)")
    parser.add_argument("--repeats", type=int, default=5, help="saves per mode (>= 2)")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("num_layers", args.layers), ("head_dim", args.width)) if v is not None}
    state = build_state(args.preset, overrides)
    params = sum(p.numel() for p in state.model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        sync = blocking_seconds(state, False, args.repeats, Path(tmp) / "sync")
        async_ = blocking_seconds(state, True, args.repeats, Path(tmp) / "async")
    sync_s, async_s = statistics.median(sync), statistics.median(async_[1:])
    print(f"preset {args.preset} {overrides or ''}: {params:,} parameters (+ AdamW moments)")
    print(f"synchronous save blocks        {sync_s * 1000:9.1f} ms (median of {args.repeats})")
    print(f"first asynchronous save blocks {async_[0] * 1000:9.1f} ms (allocates the staging buffers)")
    print(f"asynchronous save blocks       {async_s * 1000:9.1f} ms (median of the {args.repeats - 1} later saves)")
    print(f"ratio async / sync             {async_s / sync_s:9.3f}")


if __name__ == "__main__":
    main()
