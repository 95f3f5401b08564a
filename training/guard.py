"""The non-finite guard: a step whose loss or gradient norm is NaN/inf on any rank makes no update
on every rank (the weights stay those of the last good step); `optim.max_nonfinite_steps` such
steps in a row stop the run after a checkpoint of the last good state; weights that are not
finite are never checkpointed (an update can break them while its own step looked finite)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from rich.console import Console
from torch.distributed.tensor import DTensor

from lbva.errors import UserError

from .data.packing import PackedSequence
from .step import LossTerms


def _agreed(bad: bool, device) -> bool:
    """True when no rank saw `bad`."""
    if not dist.is_initialized():
        return not bad
    flag = torch.tensor([float(bad)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def finite_everywhere(terms: LossTerms | None, grad_norm: float, device) -> bool:
    """Whether the step's loss and gradient norm are finite on every rank (one agreed answer:
    pipeline ranks without the last stage see no loss)."""
    return _agreed(not math.isfinite(grad_norm) or (terms is not None and not bool(torch.isfinite(terms.total))),
                   device)


def parameters_finite(model: torch.nn.Module, device) -> bool:
    """Whether every parameter (every rank's shard of it) is finite, agreed over all ranks."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return _agreed(not all(bool(torch.isfinite(p).all()) for p in local), device)


class NonFiniteGuard:
    def __init__(self, limit: int, console: Console, dp_group, device) -> None:
        self.limit, self.console, self.dp_group, self.device = limit, console, dp_group, device
        self.streak = 0  # non-finite steps in a row

    def allows_update(self, step: int, terms: LossTerms | None, grad_norm: float, seqs: list[PackedSequence]) -> bool:
        """Whether the step's update may be applied (the same answer on every rank); a refused
        step is reported with every data-parallel rank's sample keys."""
        if finite_everywhere(terms, grad_norm, self.device):
            self.streak = 0
            return True
        self.streak += 1
        keys = [key for seq in seqs for key in seq.window_keys]
        if self.dp_group is not None:
            gathered: list = [None] * dist.get_world_size(self.dp_group)
            dist.all_gather_object(gathered, keys, group=self.dp_group)
            keys = [key for rank_keys in gathered for key in rank_keys]
        self.console.print(f"step {step}: non-finite loss or gradient norm, skipped ({self.streak} of at most "
                           f"{self.limit} in a row); samples: {', '.join(keys) or '(padding only)'}")
        return False

    @property
    def stopping(self) -> bool:
        return self.streak >= self.limit

    def stop_error(self, step: int, saved_step: int) -> UserError:
        kept = f"the checkpoint of step {saved_step}" if saved_step else "no checkpoint"
        return UserError(f"optim.max_nonfinite_steps: {self.streak} steps in a row (up to step {step}) had a "
                         f"non-finite loss or gradient norm; stopped, the last good weights are in {kept}")
