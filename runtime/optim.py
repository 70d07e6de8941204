"""Optimizer and learning-rate schedule shared by both stages."""
from __future__ import annotations

import math

import torch

LR_SCHEDULES = ("constant", "cosine")


def build_adamw(params, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0, eps: float = 1e-8,
                allow_fused: bool = True) -> torch.optim.AdamW:
    """torch AdamW; fused (one kernel for all tensors) when every parameter is on CUDA and `allow_fused`
    (DeepSpeed wraps the optimizer itself: pass allow_fused=False there). `params`: tensors or param groups."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = allow_fused and bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             **({"fused": True} if fused else {}))


def lr_at(step: int, total: int, lr: float, schedule: str = "constant", warmup_steps: int = 0,
          min_lr: float = 0.0) -> float:
    """lr for 0-based `step` of `total`: linear warmup over `warmup_steps`, then constant or cosine to `min_lr`."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"lr_schedule={schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    t = (step - warmup_steps) / max(1, total - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
