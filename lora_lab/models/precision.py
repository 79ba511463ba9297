"""Numeric precision of forward passes: the one autocast helper of the trainer and the benchmark."""
from __future__ import annotations

import torch

from lora_lab.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, key: str = "trainer.precision") -> str:
    if precision not in PRECISIONS:
        raise ConfigError(key, precision, f"must be one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str, on_cpu: bool = False, key: str = "trainer.precision"):
    """bf16: forward passes autocast to bfloat16 while weights, gradients and optimiser state stay
    fp32. On CPU only when ``on_cpu`` (the benchmark checks its bf16 path there; the trainer keeps
    fp32 on CPU, where bf16 autocast is slow on most processors). fp16: autocast to float16 on every
    device (torch's CPU autocast has float16 kernels for the layers used: linear, matmul, layer norm,
    softmax; losses stay fp32); on CUDA the trainer scales the loss with a GradScaler (``grad_scaler``)."""
    precision = check_precision(precision, key)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    enabled = precision == "bf16" and (device.type == "cuda" or on_cpu)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 on CUDA: the loss scaler that keeps small fp16 gradients from underflowing (steps with
    inf/NaN gradients are skipped). None otherwise: bf16 and fp32 need none, and fp16 on CPU runs
    without one (its gradients are fp32: autocast leaves the weights fp32)."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
