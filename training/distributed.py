"""Process-group set-up from what torchrun (or Slurm through torchrun) puts in the environment:
the device, the validated layout, the process group and the mesh of this process."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lbva.errors import UserError
from lbva.parallelism.mesh import MESH_DIMS, ParallelDims, ParallelMesh, validate_layout

from .config import TrainConfig


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


_PR_SET_PDEATHSIG = 1  # prctl option, linux/prctl.h


def die_with_agent() -> None:
    """Under torchrun, have Linux send this worker SIGTERM when its elastic agent dies.

    Without it a kill -9 of the agent leaves its workers training on as orphans, writing to the run
    directory that the next job also writes to. SIGTERM is the trainer's stop signal: the workers
    agree on a step, checkpoint it and exit. The parent is compared before and after, because an
    agent that died before prctl ran would never send the signal."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not allowed here (a seccomp sandbox): the workers outlive the agent, as before
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def init_distributed(world: WorldInfo, device: torch.device) -> None:
    """NCCL on GPUs, gloo on CPUs; a no-op for a single process or an existing group. Under
    torchrun the worker also dies with its agent (die_with_agent)."""
    die_with_agent()
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


def sum_over(values: list[float], group, device: torch.device) -> list[float]:
    """The element-wise sum of a list of floats over a process group, in one all-reduce."""
    if group is None:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """run.device: "auto" (this rank's GPU when there is one), "cuda" or "cpu"."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if choice == "cuda" else torch.device("cpu")


@dataclass
class Processes:
    """This process's place in the run: its device, the validated layout and (when there is more
    than one process) the device mesh."""

    world: WorldInfo
    device: torch.device
    dims: ParallelDims
    mesh: ParallelMesh | None

    @property
    def logging_rank(self) -> bool:
        return self.mesh is None or self.mesh.is_logging_rank

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank if self.mesh is not None else 0

    @property
    def dp_group(self):
        return self.mesh.dp.get_group() if self.mesh is not None and self.dims.dp_enabled else None

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.mesh is not None and self.dims.pp_enabled else None

    def describe(self) -> str:
        """"N process(es)" and the dims above 1, e.g. "4 process(es), dp_shard 2 x tp 2"."""
        layout = " x ".join(f"{name} {getattr(self.dims, name)}" for name in MESH_DIMS if getattr(self.dims, name) > 1)
        return f"{self.world.world_size} process(es){', ' + layout if layout else ''}"

    def close(self) -> None:
        """Wait for every rank, then end the process group (a no-op for one process)."""
        if self.world.distributed:
            dist.barrier()
            dist.destroy_process_group()


def start_processes(config: TrainConfig) -> Processes:
    """Validate config.parallel against the world torchrun started, join the process group and
    build the mesh. The layout is checked before any group exists, so a bad one fails fast."""
    world = world_from_env()
    device = resolve_device(config.run.device, world.local_rank)
    # Set the intra-op thread count explicitly once: a CPU checkpoint stages on one thread and
    # restores the count afterwards, and a count left at its implicit default is not restored to
    # the same kernels (the steps after a mid-run checkpoint then differ in the last bit from a
    # straight run's, which breaks bit-exact resume).
    torch.set_num_threads(torch.get_num_threads())
    dims = validate_layout(
        config.parallel, world.world_size, model=config.model.model_config(),
        token_budget=config.data.token_budget, pad_multiple=config.data.pad_multiple,
    )
    init_distributed(world, device)
    return Processes(world, device, dims, dims.build_mesh(device.type) if world.distributed else None)
