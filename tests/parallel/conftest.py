"""Shared fixtures of the parallel tests: tiny packed sequences and parity cases (one sequence and
one set of draws per step and data-parallel rank) that the spawned ranks and the single-process
reference both train on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from harness import PARAMETER_TOLERANCE, TrainCase, TrainRecord
from helpers import PAD_MULTIPLE, tiny_sequence
from lbva.models.config import get_preset
from lbva.training.config import ObjectiveConfig, OptimConfig
from lbva.training.step import FlowMatchingObjective

# AdamW's update g / (|g| + eps) turns a gradient's last-bit differences into parameter differences
# of up to lr where |g| is near eps; eps 1e-5 keeps such elements damped so 1e-5 is a fair bound.
PARITY_OPTIM = OptimConfig(lr=1e-3, eps=1e-5)  # each stream's token count splits evenly over tp x cp up to 32 ranks


def make_parity_case(preset: str = "tiny-mot", dp_size: int = 1, steps: int = 3, seed: int = 0) -> TrainCase:
    """`steps` optimizer steps of `dp_size` sequences each, with fixed draws."""
    text_dim = get_preset(preset).text_dim
    objective_config = ObjectiveConfig()
    empty_text = torch.zeros(6, text_dim)
    objective = FlowMatchingObjective(objective_config, empty_text)
    batches = []
    for step in range(steps):
        step_batches = []
        for dp_rank in range(dp_size):
            seq = tiny_sequence(seed * 1000 + step * dp_size + dp_rank, text_dim=text_dim)
            draws = objective.draw(seq, torch.Generator().manual_seed(seed * 1000 + step * dp_size + dp_rank))
            step_batches.append((seq, draws))
        batches.append(step_batches)
    return TrainCase(
        preset=preset, batches=batches, objective=objective_config, empty_text=empty_text,
        optim=PARITY_OPTIM, seed=seed, pad_multiple=PAD_MULTIPLE,
    )


@pytest.fixture(scope="session")
def parity_case() -> Callable[..., TrainCase]:
    """make_parity_case(preset="tiny-mot", dp_size=1, steps=3, seed=0) -> TrainCase."""
    return make_parity_case


# A bias gradient sums every token's contribution, and with the batch split over ranks that sum runs
# in another order. On an AMD EPYC host the action embedder's bias gradients of 4 sequences differ
# from one process's by 1.5e-5 of their largest entry on every 4-rank data-parallel layout alike
# (fsdp 4, hsdp, hsdp with checkpointing): float32 summation order, not a layout's doing.
GRADIENT_TOLERANCE = 4e-5


def check_parity(reference: TrainRecord, run: TrainRecord, tolerance: float = 1e-5) -> None:
    """Losses within `tolerance` relative, first-step gradients within max(`tolerance`,
    GRADIENT_TOLERANCE) of each tensor's largest entry, final parameters within
    max(`tolerance`, PARAMETER_TOLERANCE) absolute; the same parameter names."""
    assert run.parameters.keys() == reference.parameters.keys()
    assert run.gradients.keys() == reference.gradients.keys()
    for step, (expected, got) in enumerate(zip(reference.losses, run.losses, strict=True)):
        assert abs(got - expected) <= tolerance * abs(expected), f"step {step}: loss {got} vs {expected}"
    for name, expected in reference.gradients.items():
        error = (run.gradients[name] - expected).abs().max().item()
        bound = max(tolerance, GRADIENT_TOLERANCE) * expected.abs().max().item()
        assert error <= bound, f"gradient of {name}: off by {error:.2e}"
    for name, expected in reference.parameters.items():
        error = (run.parameters[name] - expected).abs().max().item()
        assert error <= max(tolerance, PARAMETER_TOLERANCE), f"{name}: off by {error:.2e}"


@pytest.fixture(scope="session")
def assert_parity() -> Callable[[TrainRecord, TrainRecord], None]:
    """check_parity(reference, run, tolerance=1e-5)."""
    return check_parity
