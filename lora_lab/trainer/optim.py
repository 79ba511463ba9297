"""The optimiser (AdamW, no weight decay on biases and norms), its schedule (warm-up, then linear or cosine decay
or constant: ``trainer.schedule``), and how a run's micro-batches add up to optimiser steps."""
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


SCHEDULES = ("linear", "cosine", "constant")  # trainer.schedule


def lr_factor(kind: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's multiplier at optimiser step ``step`` (0-based): a linear warm-up over
    ``warmup_steps``, then linear decay to 0 at ``total_steps``, cosine decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    remaining = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (1.0 - remaining)))
    return remaining


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """``trainer.schedule``: linear (the default), cosine or constant after the warm-up."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:  # a function: the scheduler's state_dict leaves it out
        return lr_factor(kind, step, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    return make_scheduler(optimizer, "linear", warmup_steps, total_steps)


def make_optimizer(model, lr: float, weight_decay: float, lr_scales: dict[str, float] | None = None):
    """AdamW over the trainable parameters: weight decay on matrices, none on biases and norms. A parameter
    ``lr_scales`` names (the method's ``lr_scales``, e.g. LoRA+'s B factors) trains at ``lr`` times its
    multiplier, in groups of their own after the two groups at ``lr`` (the schedule scales every group)."""
    lr_scales = lr_scales or {}
    groups: dict[float, tuple[list, list]] = {1.0: ([], [])}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay, no_decay = groups.setdefault(float(lr_scales.get(name, 1.0)), ([], []))
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    out = []
    for scale in [1.0, *sorted(s for s in groups if s != 1.0)]:
        decay, no_decay = groups[scale]
        lr_of = {} if scale == 1.0 else {"lr": lr * scale}
        out += [{"params": params, "weight_decay": wd, **lr_of} for params, wd in ((decay, weight_decay), (no_decay, 0.0))
                if params or scale == 1.0]
    return torch.optim.AdamW(out, lr=lr)
