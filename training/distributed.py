"""Process-group set-up from what torchrun (or Slurm through torchrun) puts in the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> WorldInfo:
    return WorldInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def _attempt_store(world: WorldInfo):
    """Under torchrun's elastic agent, a store private to this restart attempt.

    The workers' default store is the agent's, under a prefix that does not change across restarts,
    so a restarted group can read a peer address the previous attempt published and fail to
    connect (seen with gloo). Prefixing by the restart count gives every attempt clean keys."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.world_size, is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"/lbva/attempt{restart}", agent_store)


def init_distributed(world: WorldInfo, device: torch.device) -> None:
    """NCCL on GPUs, gloo on CPUs; a no-op for a single process or an existing group."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = _attempt_store(world)
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.world_size)


def checkpoint_group():
    """A gloo group for background checkpoint writes, so they never share a communicator with
    training collectives (NCCL on GPUs) running at the same time."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def mean_over(value: float, group, device: torch.device) -> float:
    """The mean of a float over a process group (every member gets it)."""
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return float(tensor) / dist.get_world_size(group)
