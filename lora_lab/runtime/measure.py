"""Measurements every run reports: parameter counts, peak memory, throughput and latency."""
from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from lora_lab.models.architectures import head_parameter_names
from lora_lab.runtime.records import not_measured
from lora_lab.runtime.timing import synchronize


def parameter_counts(model: nn.Module, method) -> dict[str, int | float]:
    """Trainable parameters broken down into the method's own, the task head's and any other."""
    method_names = method.method_parameter_names(model)
    head_names = head_parameter_names(model)
    counts = {"total": 0, "trainable": 0, "trainable_method": 0, "trainable_head": 0, "trainable_other": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
            group = "method" if name in method_names else "head" if name in head_names else "other"
            counts[f"trainable_{group}"] += p.numel()
    counts["trainable_percent"] = 100.0 * counts["trainable"] / max(counts["total"], 1)
    return counts


# ---------------------------------------------------------------- memory

def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory(generation: int = 2) -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that a run that follows
    another one in the same process (a multirun) starts from an RSS close to a fresh process's.
    ``generation``: the oldest one collected (2: all; a full collection walks every object the
    process holds, tenths of a second in a large one)."""
    gc.collect(generation)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a span: CUDA allocated/reserved after a reset, else the process's peak RSS.

    On Linux the RSS high-water mark is reset through /proc/self/clear_refs so that several runs in
    one process (a multirun) each see their own peak; elsewhere it is the process-lifetime peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_reset = False
        self.resets = 0

    def reset(self) -> None:
        # the first reset of a run frees what an earlier run in the process left (old objects); the
        # garbage between two spans of one run is young
        _release_freed_memory(2 if self.resets == 0 else 1)
        self.resets += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.rss_at_reset_kb = _read_status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss_reset = True
        except OSError:
            self.rss_reset = False

    def read(self) -> dict[str, float]:
        mib = 1024 * 1024
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {
                "peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / mib,
                "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(self.device) / mib,
                "peak_memory_kind": "cuda_allocated",
            }
        hwm = _read_status_kb("VmHWM")
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        kind = "cpu_rss_peak" if self.rss_reset else "cpu_rss_peak_process_lifetime"
        out = {"peak_memory_mb": hwm / 1024, "peak_memory_kind": kind}
        if getattr(self, "rss_at_reset_kb", None):
            out["memory_at_start_mb"] = self.rss_at_reset_kb / 1024  # model, data and libraries loaded
        return out


def higher_peak(kept: dict | None, new: dict) -> dict:
    """The larger of two peak-memory readings (of two spans, or of a run before and after a resume);
    per-rank lists element by element."""
    if not kept:
        return dict(new)
    out = dict(kept)
    for key in ("peak_memory_mb", "peak_memory_reserved_mb"):
        if key in new:
            out[key] = max(out.get(key, 0.0), new[key])
        if f"{key}_per_rank" in new:
            previous = out.get(f"{key}_per_rank") or [0.0] * len(new[f"{key}_per_rank"])
            out[f"{key}_per_rank"] = [max(a, b) for a, b in zip(previous, new[f"{key}_per_rank"])]
    return out


def combine_ranks(readings: list[dict]) -> dict:
    """One reading from every rank's: the maximum (what the largest process needed) and, over several
    ranks, each rank's peak."""
    if len(readings) == 1:
        return readings[0]
    out = dict(readings[0])
    for key in ("peak_memory_mb", "peak_memory_reserved_mb"):
        if key in out:
            out[f"{key}_per_rank"] = [r[key] for r in readings]
            out[key] = max(out[f"{key}_per_rank"])
    return out


# ---------------------------------------------------------------- time

class Throughput:
    """Training throughput over the steps after the first ``warmup_steps`` of each process (a resumed
    run warms up again; its earlier measured steps are carried over with ``restore``)."""

    def __init__(self, warmup_steps: int, device: torch.device):
        self.warmup_steps, self.device = warmup_steps, device
        self.steps = 0
        self.seconds = self.samples = self.tokens = 0.0
        self.step_times: list[float] = []

    @contextmanager
    def step(self, batch: dict, examples: int | None = None):
        """``examples``: how many of the batch's examples count (0: a stand-in, see lora_lab.data.sampling)."""
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.seconds += elapsed
            counted = batch["input_ids"].shape[0] if examples is None else examples
            self.samples += counted
            self.tokens += float(batch["attention_mask"][:counted].sum())
            self.step_times.append(elapsed)

    def state(self) -> dict[str, float]:
        return {"seconds": self.seconds, "samples": self.samples, "tokens": self.tokens}

    def restore(self, state: dict[str, float], step_times: list[float]) -> None:
        self.seconds, self.samples, self.tokens = state["seconds"], state["samples"], state["tokens"]
        self.step_times = list(step_times)

    def summary(self) -> dict[str, float]:
        """This process's figures (over several ranks, ``throughput_over_ranks`` gives the run's)."""
        if not self.step_times:  # null with the reason: strict JSON has no NaN
            reason = (f"no steps after the warm-up (trainer.throughput_warmup_steps={self.warmup_steps}, "
                      f"{self.steps} micro-batches in this process)")
            return {**not_measured("train_samples_per_s", reason), **not_measured("train_tokens_per_s", reason),
                    **not_measured("train_step_ms_median", reason), "measured_steps": 0}
        return {
            "train_samples_per_s": self.samples / self.seconds,
            "train_tokens_per_s": self.tokens / self.seconds,
            "train_step_ms_median": 1000 * statistics.median(self.step_times),
            "measured_steps": len(self.step_times),
        }


def throughput_over_ranks(states: list[dict[str, float]]) -> dict:
    """The run's training throughput from every rank's ``Throughput.state()``: the sum of the ranks'
    rates (each rank's examples over its own measured time). Empty for one process, where
    ``Throughput.summary`` already is the run's."""
    if len(states) <= 1:
        return {}
    rates = [(s["samples"] / s["seconds"], s["tokens"] / s["seconds"]) if s["seconds"] else (None, None)
             for s in states]
    if any(r[0] is None for r in rates):  # null with the reason: strict JSON has no NaN
        reason = "a rank measured no steps after the warm-up (trainer.throughput_warmup_steps)"
        return {**not_measured("train_samples_per_s", reason), **not_measured("train_tokens_per_s", reason),
                "train_samples_per_s_per_rank": [r[0] for r in rates], "world_size": len(states)}
    return {"train_samples_per_s": sum(r[0] for r in rates), "train_tokens_per_s": sum(r[1] for r in rates),
            "train_samples_per_s_per_rank": [r[0] for r in rates], "world_size": len(states)}
