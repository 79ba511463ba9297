"""Section 3c: the training state one rank holds under DDP and under FSDP (``trainer.strategy=fsdp``),
predicted from a model's tensors; no process starts and nothing is sharded.

Counted in bytes from the parameters, with the method applied: weights (every parameter), gradients
(one per trainable parameter, of its dtype) and AdamW's state (``exp_avg`` and ``exp_avg_sq`` like each
trainable parameter, plus its fp32 ``step``: 4 bytes per tensor). Per rank, of N ranks:

    DDP:   weights + gradients + AdamW state                      (replicated on every rank)
    FSDP:  (weights + gradients + AdamW state) / N + largest unit

FSDP (lora_lab.runtime.sharding) shards every transformer block and then the root, and gathers one such
unit whole while it runs forward or backward: the largest unit is the bigger of the largest block's
parameters and the root's own (embeddings, head, whatever lies outside the blocks), in the dtype they
are gathered in (bf16 with ``precision=bf16`` on CUDA, as the trainer's policy; else their own).
Not counted, under either strategy: activations and buffers; and, under FSDP, the next unit prefetched,
a unit's whole gradient before it is reduce-scattered, communication buffers and shard padding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lora_lab.bench.memory import MiB, nbytes
from lora_lab.bench.variants import BENCH_SCHEDULE_STEPS, method_config
from lora_lab.methods import build_method
from lora_lab.models.architectures import layer_stack
from lora_lab.runtime import sharding

ADAMW_STEP_BYTES = 4  # torch.optim.AdamW's per-tensor step count: an fp32 scalar


@dataclass
class StateBytes:
    weights: int
    gradients: int
    optimizer: int
    largest_unit: int  # the parameters FSDP gathers whole at one time: a block's or the root's own

    @property
    def sharded(self) -> int:
        return self.weights + self.gradients + self.optimizer


def state_bytes(model: nn.Module, blocks: nn.ModuleList, gather_dtype: torch.dtype | None = None) -> StateBytes:
    """The byte counts of ``model`` (with its method applied) whose transformer blocks are ``blocks``;
    ``gather_dtype``: the dtype FSDP gathers parameters in (None: their own)."""
    params = list(model.parameters())  # tied parameters once
    trainable = [p for p in params if p.requires_grad]

    size = torch.empty(0, dtype=gather_dtype).element_size() if gather_dtype is not None else None

    def gathered(group) -> int:
        return sum(p.numel() * (size or p.element_size()) for p in group)

    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    units = [gathered(block.parameters()) for block in blocks]
    units.append(gathered(p for p in params if id(p) not in in_blocks))
    return StateBytes(weights=sum(nbytes(p) for p in params), gradients=sum(nbytes(p) for p in trainable),
                      optimizer=sum(2 * nbytes(p) + ADAMW_STEP_BYTES for p in trainable), largest_unit=max(units))


def per_rank(state: StateBytes, strategy: str, world_size: int) -> dict:
    """One rank's share (MiB) of ``state`` under ``strategy`` over ``world_size`` ranks."""
    share = 1 if strategy == "ddp" else world_size
    gathered = 0 if strategy == "ddp" else state.largest_unit
    row = {"strategy": strategy, "world_size": world_size, "weights_mb": state.weights / share / MiB,
           "gradients_mb": state.gradients / share / MiB, "optimizer_state_mb": state.optimizer / share / MiB,
           "gathered_mb": gathered / MiB}
    row["total_mb"] = (state.sharded / share + gathered) / MiB
    return row


def sharded_memory(cfg, base: nn.Module, device: torch.device) -> dict:
    """Rows for every arm of ``sharded_memory.arms`` x world size x strategy, keyed ``arm/strategy/N``."""
    precision = "bf16" if str(cfg.get("precision") or "fp32") == "bf16" else "fp32"
    gather_dtype = sharding.mixed_precision(device, precision).param_dtype
    rows = {}
    for arm in map(str, cfg.sharded_memory.arms):
        model = copy.deepcopy(base)
        method = build_method(method_config(arm, cfg))
        method.total_steps = BENCH_SCHEDULE_STEPS  # as build_ours: AdaLoRA plans its budget by it
        method.apply(model)
        state = state_bytes(model, layer_stack(model)[1], gather_dtype)
        for world in map(int, cfg.sharded_memory.world_sizes):
            for strategy in sharding.STRATEGIES:
                rows[f"{arm}/{strategy}/{world}"] = {"arm": arm, "label": method.label(),
                                                     **per_rank(state, strategy, world)}
        del model
    return rows
