"""The optimiser (AdamW, no weight decay on biases and norms), its linear warm-up/decay schedule, and
how a run's micro-batches add up to optimiser steps."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """How a run's micro-batches make optimiser steps."""
    accum: int  # micro-batches per optimiser step (trainer.grad_accum)
    batches_per_epoch: int  # micro-batches
    steps_per_epoch: int  # optimiser steps; an epoch's last may take fewer than ``accum`` micro-batches
    total_steps: int  # over all epochs, at most trainer.max_steps
    warmup_steps: int


def plan_schedule(tcfg, batches_per_epoch: int) -> Schedule:
    accum = int(tcfg.get("grad_accum") or 1)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.get("max_steps"):
        total_steps = min(total_steps, int(tcfg.max_steps))
    warmup_steps = (int(tcfg.warmup_steps) if tcfg.get("warmup_steps") is not None
                    else int(math.ceil(tcfg.warmup_ratio * total_steps)))
    return Schedule(accum, batches_per_epoch, steps_per_epoch, total_steps, warmup_steps)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)
