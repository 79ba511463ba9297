"""Section 5: training tokens/s on the real data with per-batch vs fixed-length padding."""
from __future__ import annotations

import math
import statistics

import torch

from lora_lab.errors import ConfigError
from lora_lab.bench.timing import load_summary, round_robin, summarise
from lora_lab.bench.variants import Variant


def bench_data_path(cfg, data, lora: Variant, device: torch.device) -> dict:
    from lora_lab.data import Collator

    dcfg = cfg.data_path
    max_length = int(dcfg.max_length or cfg.data.max_length)
    collators = {"batch": Collator(data.pad_token_id, "batch"),
                 "max_length": Collator(data.pad_token_id, "max_length", max_length)}
    train = data.splits["train"]
    bs, n = int(cfg.batch_size), int(dcfg.warmup) + int(dcfg.steps)
    if len(train) < bs:
        raise ConfigError("batch_size", bs, f"exceeds the {len(train)} training rows")
    g = torch.Generator().manual_seed(int(cfg.seed))
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(math.ceil(n * bs / len(train)))])
    rows = [[train[int(i)] for i in order[j * bs:(j + 1) * bs]] for j in range(n)]
    tokens = [sum(len(r["input_ids"]) for r in batch_rows) for batch_rows in rows]
    padded = {mode: [] for mode in collators}

    def run(mode: str, k: int) -> None:
        batch = collators[mode](rows[k])
        if k >= int(dcfg.warmup):
            padded[mode].append(int(batch["input_ids"].numel()))
        lora.step({key: value.to(device) for key, value in batch.items()})

    lora.model.train()
    other: dict[str, list] = {}
    times = round_robin({mode: (lambda k, mode=mode: run(mode, k)) for mode in collators}, int(dcfg.steps),
                        int(dcfg.warmup), device, other_load=other)
    counted = tokens[int(dcfg.warmup):]
    out = {"r": int(dcfg.r), "batch_size": bs, "steps": int(dcfg.steps), "max_length": max_length,
           "tokens_per_batch_mean": statistics.fmean(counted), "other_processes_cpu_share": load_summary(other),
           "rows": {}}
    for mode in collators:
        per_step = [t / s for t, s in zip(counted, times[mode])]
        out["rows"][mode] = {"tokens_per_s": sum(counted) / sum(times[mode]),
                             "tokens_per_s_per_step": summarise(per_step),
                             "step_ms": summarise(times[mode], 1000),
                             "padded_length_mean": statistics.fmean(padded[mode]) / bs,
                             "padding_fraction": 1 - sum(counted) / sum(padded[mode])}
    out["ratio"] = out["rows"]["batch"]["tokens_per_s"] / out["rows"]["max_length"]["tokens_per_s"]
    return out
