"""Section 5: what checkpointing costs. One checkpoint write (as the trainer writes it: trainable state,
AdamW state, RNG states and progress, fsynced and renamed) and one training step, interleaved round by
round; the overhead per step at an interval of N steps is write / (N x step). Beside it, what a finished
run keeps of each method: its trainable state as the trainer writes it, against the ΔW file (factors
plus a copy of every adapted W0) that runs of record version 2 kept beside that state."""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from lora_lab.bench.variants import Variant
from lora_lab.runtime import checkpoint, records
from lora_lab.runtime.timing import round_robin


def trainer_interval() -> int:
    from lora_lab.config.compose import compose

    return int(compose("train").trainer.checkpoint_every)


def bench_checkpoint(cfg, arms: dict[str, Variant], batch: dict, device: torch.device) -> dict:
    from lora_lab.trainer.optim import linear_schedule
    from lora_lab.trainer.progress import Progress

    every = int(cfg.checkpoint.every or trainer_interval())
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, variant in arms.items():
            folder = Path(directory) / name
            scheduler = linear_schedule(variant.optimizer, 10, 10_000)
            progress = Progress().to_dict()
            series = {"epoch_losses": torch.zeros(every, dtype=torch.float64),
                      "step_seconds": torch.zeros(every, dtype=torch.float64)}

            def write(k, v=variant, s=scheduler, f=folder):
                checkpoint.save(f, v.model, v.optimizer, s, {"arm": name}, progress, series)

            fns = {"step": lambda k, v=variant: v.step(batch), "checkpoint": write}
            times = round_robin(fns, int(cfg.checkpoint.repeats), int(cfg.checkpoint.warmup), device)
            step, written = statistics.median(times["step"]), statistics.median(times["checkpoint"])
            rows[name] = {"label": variant.label, "trainable_params": variant.trainable, "step_ms": 1000 * step,
                          "checkpoint_ms": 1000 * written, "checkpoint_ms_min": 1000 * min(times["checkpoint"]),
                          "checkpoint_ms_max": 1000 * max(times["checkpoint"]),
                          "checkpoint_mb": (folder / checkpoint.LAST).stat().st_size / 2**20,
                          "overhead": written / (every * step), **run_file_sizes(variant, folder)}
    return {"every": every, "repeats": int(cfg.checkpoint.repeats), "rows": rows}


def run_file_sizes(variant: Variant, folder: Path) -> dict:
    """MiB of the trainable state a run keeps, and of the ΔW file version 2 records kept beside it."""
    state = folder / records.STATE_FILE
    records.save_tensors(state, checkpoint.trainable_state(variant.model))
    deltas = variant.method.delta_weights(variant.model) if variant.method is not None else {}
    delta_mb = 0.0
    if deltas:
        old = folder / records.DELTA_FILE
        records.save_delta_weights(old, deltas)
        delta_mb = old.stat().st_size / 2**20
    return {"state_mb": state.stat().st_size / 2**20, "delta_w_v2_mb": delta_mb}
