"""The numbers of one logging window: loss terms and gradient norm summed per step, real tokens
counted, and turned into the logged means (over steps and data-parallel ranks) and tokens/s."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .data.packing import PackedSequence
from .distributed import mean_over
from .step import LossTerms


def loss_metrics(terms: LossTerms | None) -> dict[str, float]:
    """The logged loss terms; empty on a pipeline rank without the last stage (the logging rank
    is one that has it)."""
    if terms is None:
        return {}
    metrics = {"loss": terms.total.item(), "loss_video": terms.video.item(), "loss_action": terms.action.item()}
    if terms.forward_dynamics is not None:
        metrics["loss_fdm"] = terms.forward_dynamics.item()
    return metrics


class MetricsWindow:
    def __init__(self, log_every: int, total_steps: int, dp_size: int) -> None:
        self.log_every, self.total_steps, self.dp_size = log_every, total_steps, dp_size
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, terms: LossTerms | None, grad_norm: float, seqs: Sequence[PackedSequence]) -> None:
        for key, value in {**loss_metrics(terms), "grad_norm": grad_norm}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.tokens += sum(seq.real_tokens for seq in seqs)

    def due(self, step: int) -> bool:
        """Whether `step` closes a window (every log_every steps, and the run's last step)."""
        return step % self.log_every == 0 or step == self.total_steps

    def close(self, dp_group, device: torch.device, **extra: float) -> dict[str, float]:
        """The window's metrics, equal on every rank of dp_group, plus `extra`; starts the next window."""
        elapsed = time.perf_counter() - self.started
        metrics = {key: mean_over(total / self.steps, dp_group, device) for key, total in self.sums.items()}
        # grad_norm is global already; tokens add up over the data-parallel ranks.
        metrics["grad_norm"] = self.sums["grad_norm"] / self.steps
        metrics.update(extra, tokens_per_s=self.tokens * self.dp_size / elapsed)
        self._reset()
        return metrics
