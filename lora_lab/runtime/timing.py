"""Timing: timed calls, round-robin A/B rounds, other processes' CPU load, medians and ratios.

The one interleaved-timing helper of the project: the trainer's merged-vs-unmerged latency and every
section of the benchmark use ``round_robin``."""
from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class OtherLoad:
    """The share of the machine's CPU time that other processes used over a span: all CPUs' busy
    time (/proc/stat) minus this process's own CPU time, over wall time x CPUs. None off Linux, and
    for spans too short for the kernel's clock ticks (10 ms) to tell."""

    MIN_SPAN_S = 0.25

    def __init__(self):
        self.tick, self.cpus = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
        self.mark = self._read()

    @staticmethod
    def _busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        return sum(v) - v[3] - v[4]

    def _read(self):
        own = os.times()
        return time.perf_counter(), self._busy_ticks(), own.user + own.system

    def share(self) -> float | None:
        """Since the previous call (or construction)."""
        (w0, b0, o0), (w1, b1, o1) = self.mark, self._read()
        self.mark = (w1, b1, o1)
        if b0 is None or b1 is None or w1 - w0 < self.MIN_SPAN_S:
            return None
        return max(0.0, ((b1 - b0) / self.tick - (o1 - o0)) / ((w1 - w0) * self.cpus))


def round_robin(fns: dict[str, Callable[[int], object]], rounds: int, warmup: int, device: torch.device,
                per_sample: int = 1, other_load: dict[str, list] | None = None,
                enter: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every function, interleaved: ``warmup`` untimed rounds, then ``rounds``
    timed ones; each round calls every function (``per_sample`` times, averaged) with the round index,
    starting one further along the list each round. Garbage is collected between rounds, never during
    one. ``other_load``, if given, receives per name the CPU share other processes took during each
    sample. ``enter``, if given, maps a name to an untimed call made before its sample (e.g. merging
    LoRA into the weights of a model that the variants share)."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    load = OtherLoad()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for k in range(warmup + rounds):
            shift = k % len(names)
            gc.collect(2 if k == 0 else 0)  # with gc disabled, everything allocated since is in generation 0
            for name in names[shift:] + names[:shift]:
                if enter and name in enter:
                    enter[name]()
                load.share()
                seconds = sum(timed(lambda: fns[name](k), device) for _ in range(per_sample)) / per_sample
                share = load.share()
                if k >= warmup:
                    samples[name].append(seconds)
                    if other_load is not None:
                        other_load.setdefault(name, []).append(share)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


DISTURBED = 0.10  # a sample during which other processes used more than this share of the CPUs


def load_summary(other_load: dict[str, list]) -> dict:
    """Other processes' CPU share over a section's timed samples, and how many samples it disturbed."""
    shares = [x for values in other_load.values() for x in values if x is not None]
    if not shares:
        return {"available": False}
    return {"available": True, "median": statistics.median(shares), "max": max(shares),
            "samples": len(shares), "disturbed_samples": sum(x > DISTURBED for x in shares),
            "per_name": other_load}


def summarise(values: list[float], scale: float = 1.0) -> dict:
    """Median and range of one figure's samples (scaled, e.g. seconds -> ms)."""
    vals = [v * scale for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "samples": vals}


def compare(a: dict, b: dict) -> dict:
    """a relative to b: the ratio of the medians, and the range of the per-round ratios (a and b were
    measured in the same rounds, so each round gives one paired ratio)."""
    paired = [x / y for x, y in zip(a["samples"], b["samples"])]
    return {"ratio": a["median"] / b["median"], "paired_min": min(paired), "paired_max": max(paired)}
