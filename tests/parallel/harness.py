"""Spawned gloo worlds and the parity runs the parallel tests are built from.

The spawn pieces (`free_port`, `spawn_ranks`) are what a local multi-process run needs; the rest
trains the same model on the same data twice, once in one process and once on a parallel layout,
so the tests can compare losses, gradients and parameters.

A parity case gives, per optimizer step, one (packed sequence, draws) pair per data-parallel rank.
The reference processes every dp rank's pair and averages their losses, which is exactly the
gradient data parallelism computes (FSDP averages over dp); tp/cp ranks of one dp rank read the
same pair. Pipeline parallelism trains differently (a schedule, not model(inputs)); it plugs in
its own per-rank function with `parallel_run(..., rank_fn=...)` and reuses the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

from lbva.models.config import get_preset
from lbva.models.mot import LingBotVA
from lbva.training.config import ObjectiveConfig, OptimConfig
from lbva.training.optim import build_optimizer
from lbva.training.data.packing import PackedSequence
from lbva.parallelism.mesh import ParallelConfig, ParallelDims
from lbva.parallelism.parallelize import parallelize, step_layout_for
from lbva.training.step import FlowMatchingObjective, StepDraws, run_objective

CPU = torch.device("cpu")


def free_port() -> int:
    """A TCP port free right now on localhost, for MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    # Several ranks share two cores: one intra-op thread each avoids oversubscription stalls.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(world_size: int, fn: Callable, *args: Any) -> list[Any]:
    """Run fn(*args) on `world_size` new gloo ranks (env init on a free port) and return each
    rank's result, in rank order. fn must be importable (module level); a rank's exception is
    raised here.

    Ranks start from a fork server that imported torch and this package once: like spawn, they
    inherit no thread pools or CUDA state from the caller, but they start in milliseconds instead
    of importing torch each (seconds per rank, which dominated the parallel tests).
    """
    # torch._dynamo: FSDP2 and checkpointing import it on first use, a second per rank otherwise.
    multiprocessing.set_forkserver_preload([__name__, "torch._dynamo"])
    with tempfile.TemporaryDirectory(prefix="lbva-ranks-") as out_dir:
        mp.start_processes(
            _rank_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True,
            start_method="forkserver",
        )
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


# Final parameters after the cases' AdamW steps, absolute. AdamW divides each gradient entry by
# its own running scale, so entries near zero turn summation-order differences (gradients agree
# to 1e-5 of each tensor's largest entry) into parameter differences of a few 1e-5 of lr 1e-3
# steps; with the pass-through video head (LingBotVA.init_weights) they reach 1.5e-5.
PARAMETER_TOLERANCE = 3e-5


@dataclass
class TrainCase:
    """One parity case: the model, the data and every random draw, fixed in advance."""

    preset: str
    batches: list[list[tuple[PackedSequence, StepDraws]]]  # [step][dp rank]
    objective: ObjectiveConfig
    empty_text: torch.Tensor  # [T, text_dim]
    optim: OptimConfig
    seed: int = 0
    pad_multiple: int = 32

    @property
    def dp_size(self) -> int:
        return len(self.batches[0])

    @property
    def token_budget(self) -> int:
        seq = self.batches[0][0][0]
        return seq.video_x0.shape[0] + seq.action_x0.shape[0]


@dataclass
class TrainRecord:
    losses: list[float]  # per step, mean over dp ranks
    # Full (unsharded) fp32 values on CPU. Gradients of the first step, before any update: AdamW's
    # steps are invariant to a gradient's scale, so parameters alone would hide a wrong reduction.
    gradients: dict[str, torch.Tensor]
    parameters: dict[str, torch.Tensor]  # after the last step


def build_case_model(case: TrainCase) -> LingBotVA:
    """The case's model, initialised identically in every process from the case's seed."""
    torch.manual_seed(case.seed)
    return LingBotVA(get_preset(case.preset))


def _full(value: torch.Tensor) -> torch.Tensor:
    value = value.full_tensor() if isinstance(value, DTensor) else value
    return value.detach().float().cpu().clone()


def gather_full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value on CPU; a collective when parameters are DTensors."""
    return {name: _full(param) for name, param in model.named_parameters()}


def gather_full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient's full value on CPU (Partial gradients summed); a collective for DTensors."""
    return {name: _full(param.grad) for name, param in model.named_parameters() if param.grad is not None}


def reference_run(case: TrainCase) -> TrainRecord:
    """One process: each step averages the losses of every dp rank's sequence, then steps AdamW."""
    model = build_case_model(case)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    optimizer = build_optimizer(model, case.optim)
    losses, gradients = [], {}
    for step, step_batches in enumerate(case.batches):
        loss = torch.stack([objective(model, seq, draws, "sdpa", CPU).total for seq, draws in step_batches]).mean()
        loss.backward()
        if step == 0:
            gradients = gather_full_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return TrainRecord(losses, gradients, gather_full_parameters(model))


def train_rank(case: TrainCase, parallel: ParallelConfig) -> TrainRecord:
    """Runs on each rank of a spawned world: build the mesh, the model, parallelize, train.
    Every rank returns its full parameters; losses are the dp mean, the same on every rank."""
    dims = ParallelDims.resolve(
        parallel, dist.get_world_size(), model=get_preset(case.preset), token_budget=case.token_budget,
        pad_multiple=case.pad_multiple,
    )
    if dims.dp_size != case.dp_size:
        raise ValueError(f"the case holds {case.dp_size} sequences per step, the layout has {dims.dp_size} dp ranks")
    mesh = dims.build_mesh("cpu")
    model = parallelize(build_case_model(case), mesh, parallel)
    objective = FlowMatchingObjective(case.objective, case.empty_text)
    layout = step_layout_for(mesh, "sdpa")
    optimizer = build_optimizer(model, case.optim)
    dp_rank, dp_group = mesh.dp_rank, mesh.dp.get_group()
    losses, gradients = [], {}
    for step, step_batches in enumerate(case.batches):
        seq, draws = step_batches[dp_rank]
        loss = run_objective(objective, model, [(seq, draws)], layout, CPU).total
        loss.backward()
        if step == 0:
            gradients = gather_full_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=dp_group)
        losses.append(reported.item() / dims.dp_size)
    return TrainRecord(losses, gradients, gather_full_parameters(model))


def parallel_run(
    case: TrainCase, parallel: ParallelConfig, world_size: int, rank_fn: Callable[..., TrainRecord] = train_rank
) -> TrainRecord:
    """Spawn `world_size` gloo ranks running rank_fn(case, parallel); merge their records: the
    losses of rank 0 (every rank reports the dp mean) and the union of the gradients and parameters
    the ranks returned (pipeline stages each hold a part of the model)."""
    records = spawn_ranks(world_size, rank_fn, case, parallel)
    gradients: dict[str, torch.Tensor] = {}
    parameters: dict[str, torch.Tensor] = {}
    for record in records:
        gradients.update(record.gradients)
        parameters.update(record.parameters)
    return TrainRecord(records[0].losses, gradients, parameters)
