"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig, TrainConfig


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """Weight decay applies to weight matrices; biases, norms and modulation tables are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and not name.endswith("scale_shift_table")
        (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based): linear warmup over
    warmup_steps, then cosine from 1 down to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig, saved: dict,
                       step: int) -> list[str]:
    """After a resume at `step`: the config's optimizer and schedule settings replace what the
    loaded optimizer and scheduler state hold (lr, betas, eps, weight decay) and what the
    checkpoint was saved with (warmup, min lr ratio, run length). Called on every rank.
    `saved`: the checkpoint's config (config_to_dict form). -> "key old -> new" per changed key."""
    optim = config.optim
    decay_group = optimizer.param_groups[0]  # build_optimizer: matrices first, decayed
    loaded = {"lr": scheduler.base_lrs[0], "betas": list(decay_group["betas"]), "eps": decay_group["eps"],
              "weight_decay": decay_group["weight_decay"]}
    previous = {f"optim.{key}": value for key, value in saved.get("optim", {}).items()}
    previous.update({f"optim.{key}": value for key, value in loaded.items()})
    previous["run.steps"] = saved.get("run", {}).get("steps")
    wanted = {f"optim.{key}": getattr(optim, key) for key in ("lr", "eps", "weight_decay", "warmup_steps",
                                                              "min_lr_ratio")}
    wanted.update({"optim.betas": list(optim.betas), "run.steps": config.run.steps})
    changes = [f"{key} {previous[key]} -> {value}" for key, value in wanted.items()
               if previous.get(key) is not None and previous[key] != value]
    lr = optim.lr * lr_factor(step, config.run.steps, optim)
    for group, weight_decay in zip(optimizer.param_groups, (optim.weight_decay, 0.0)):
        group.update(lr=lr, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=weight_decay)
    # LambdaLR multiplies base_lrs, which its loaded state set to the checkpoint's peak lr.
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [lr] * len(optimizer.param_groups)
    return changes
