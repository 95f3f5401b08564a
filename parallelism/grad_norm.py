"""Gradient clipping for any dp/tp/cp layout: after `parallelize` every parameter is a DTensor on
one mesh, so torch's own clipping computes the global norm (as a DTensor) with the right reductions."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most max_norm; returns the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
