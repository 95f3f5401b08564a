"""The guards of the loop, each decided alike on every rank.

The non-finite guard: a step whose loss or gradient norm is NaN/inf on any rank makes no update
on every rank (the weights stay those of the last good step); `optim.max_nonfinite_steps` such
steps in a row stop the run after a checkpoint of the last good state; weights that are not
finite are never checkpointed (an update can break them while its own step looked finite).

The data guard: bad data under data.on_error='fail' on any rank stops every rank with its one
message; under 'skip', a run whose skipped samples pass data.max_skipped_fraction stops with a
line naming the sources and shards, instead of training on padding with a loss of zero."""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist
from rich.console import Console
from torch.distributed.tensor import DTensor

from lbva.errors import UserError

from .data.loader import PackedLoader
from .data.packing import PackedSequence
from .data.reader import DataError
from .distributed import sum_over
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


# The skipped fraction is judged from this many sample reads on (fewer say little), and at once
# at a step without a single real token.
FRACTION_AFTER_SAMPLES = 20


class DataGuard:
    """Checks each step's data on every rank with one all-reduce (the module docstring says what stops)."""

    def __init__(self, max_skipped_fraction: float, loader: PackedLoader, dp_group, device) -> None:
        self.max_fraction, self.loader, self.dp_group, self.device = max_skipped_fraction, loader, dp_group, device

    def check(self, step: int, seqs: list[PackedSequence], failure: DataError | None) -> None:
        """Raise on every rank, with one message, when any rank's data of `step` failed
        (`failure`: the DataError its loader raised under on_error='fail') or when the samples
        skipped so far, over all data-parallel ranks, pass the bound."""
        local = [float(failure is not None), float(sum(seq.real_tokens for seq in seqs)),
                 float(self.loader.samples_read), float(self.loader.samples_skipped)]
        failed, tokens, read, skipped = sum_over(local, self.dp_group, self.device)
        if failed:
            raise DataError(next(m for m in self._gathered(None if failure is None else str(failure)) if m))
        judged = read >= FRACTION_AFTER_SAMPLES or tokens == 0
        if judged and skipped > self.max_fraction * read:
            empty = f"step {step} has no real token; " if tokens == 0 else ""
            raise UserError(f"data.max_skipped_fraction: {empty}{int(skipped)} of {int(read)} samples read so far "
                            f"were bad and skipped (more than {self.max_fraction:g}); stopped at step {step}. "
                            f"{self._bad_shards()}; the warnings above name each sample")

    def _gathered(self, item):
        if self.dp_group is None:
            return [item]
        gathered: list = [None] * dist.get_world_size(self.dp_group)
        dist.all_gather_object(gathered, item, group=self.dp_group)
        return gathered

    def _bad_shards(self) -> str:
        """"bad samples by source: NAME N in SHARD, SHARD (+k more); ..." over all data-parallel ranks."""
        counts: Counter[tuple[str, str]] = Counter()
        for part in self._gathered(dict(self.loader.bad_shards)):
            counts.update(part)
        by_source: dict[str, list[str]] = {}
        for (source, shard), _ in counts.most_common():
            by_source.setdefault(source or "?", []).append(shard)
        parts = []
        for source, shards in sorted(by_source.items()):
            total = sum(n for (s, _), n in counts.items() if (s or "?") == source)
            more = f" (+{len(shards) - 3} more)" if len(shards) > 3 else ""
            parts.append(f"{source} {total} in {', '.join(shards[:3])}{more}")
        return "bad samples by source: " + "; ".join(parts)
