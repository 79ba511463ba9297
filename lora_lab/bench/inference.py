"""Section 3: inference latency of the base model and of LoRA unmerged and merged."""
from __future__ import annotations

import copy

import torch
from torch import nn

from lora_lab.bench.variants import Variant, precision_of, synthetic_batch
from lora_lab.models.precision import autocast
from lora_lab.runtime.timing import compare, load_summary, round_robin, summarise


def bench_inference(cfg, base: nn.Module, ours: Variant, batch: dict, device: torch.device) -> dict:
    """Base model vs a mergeable arm unmerged, merged, and merged and unloaded to plain layers (where
    the method has that form: LoRA)."""
    icfg = cfg.inference
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base_model = copy.deepcopy(base).to(device).eval()
    unmerged = copy.deepcopy(ours.model).eval()
    merged = copy.deepcopy(ours.model).eval()
    ours.method.prepare_inference(merged)
    models = {"base": base_model, "unmerged": unmerged, "merged": merged}
    unloaded = ours.method.merge_and_unload(copy.deepcopy(ours.model))  # None: no plain-layer form
    if unloaded is not None:
        models["merged_unloaded"] = unloaded.eval()
    with torch.inference_mode(), autocast(device, precision_of(cfg), on_cpu=True, key="precision"):
        diff = float((merged(**inputs).logits - unmerged(**inputs).logits).abs().max())
        other: dict[str, list] = {}
        times = round_robin({name: (lambda k, m=m: m(**inputs)) for name, m in models.items()},
                            int(icfg.repeats), int(icfg.warmup), device, other_load=other)
    out = {"unit": "ms", "arm": str(icfg.arm), "label": ours.label, "batch_size": int(inputs["input_ids"].shape[0]),
           "seq_len": int(inputs["input_ids"].shape[1]), "repeats": int(icfg.repeats),
           "merged_vs_unmerged_max_abs_logit_diff": diff, "other_processes_cpu_share": load_summary(other),
           "rows": {}}
    ref = summarise(times["base"], 1000)
    for name in models:
        s = summarise(times[name], 1000)
        c = compare(s, ref)
        out["rows"][name] = {"latency_ms": s, "ratio_to_base": s["median"] / ref["median"],
                             "paired_ratio_min": c["paired_min"], "paired_ratio_max": c["paired_max"]}
    out["merged"] = out["rows"]["merged"]["ratio_to_base"]
    out["unmerged"] = out["rows"]["unmerged"]["ratio_to_base"]
    return out


def inference_batch(cfg, model: nn.Module, num_labels: int, device: torch.device) -> dict:
    return synthetic_batch(model, num_labels, int(cfg.inference.batch_size), int(cfg.inference.seq_len),
                           int(cfg.seed) + 1, device)
