"""Gradient clipping for any layout: after `parallelize` every parameter is a DTensor on one mesh,
so torch's own norm is the global norm of this rank's parameters; pipeline stages then combine
their squared norms over the pp group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> float:
    """Scale gradients so their global L2 norm is at most max_norm; returns the norm before."""
    parameters = [p for p in parameters if p.grad is not None]
    if pp_group is None:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    squared = (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    dist.all_reduce(squared, group=pp_group)
    total = float(squared.sqrt())
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for param in parameters:
            param.grad.mul_(scale)
    return total
