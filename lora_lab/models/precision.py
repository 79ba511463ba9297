"""Numeric precision of forward passes: the one autocast helper of the trainer and the benchmark."""
from __future__ import annotations

import torch

from lora_lab.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, key: str = "trainer.precision") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(key, precision, f"must be one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str, on_cpu: bool = False, key: str = "trainer.precision"):
    """bf16: forward passes autocast to bfloat16 while weights, gradients and optimiser state stay
    fp32. On CPU only when ``on_cpu`` (the benchmark checks its bf16 path there; the trainer keeps
    fp32 on CPU, where bf16 autocast is slow on most processors)."""
    enabled = check_precision(precision, key) == "bf16" and (device.type == "cuda" or on_cpu)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
