"""Sections 1 and 2: training step time per method against the frozen-backbone limit; each method
with a PEFT counterpart against its PEFT twin (outputs compared first, on the same weights)."""
from __future__ import annotations

import torch

from lora_lab.bench.variants import REFERENCE, TWIN_PREFIX, Variant
from lora_lab.runtime.timing import compare, load_summary, round_robin, summarise


@torch.no_grad()
def max_logit_difference(a: Variant, b: Variant, batch: dict) -> float:
    """Largest absolute difference between two variants' logits on one batch, in eval mode; over the real
    tokens' positions when one variant also returns logits for virtual tokens (PEFT's prompt tuning)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    a.model.eval(), b.model.eval()
    try:
        la, lb = a.model(**inputs).logits.float(), b.model(**inputs).logits.float()
        if la.dim() == 3 and la.shape[1] != lb.shape[1]:
            n = min(la.shape[1], lb.shape[1])
            la, lb = la[:, -n:], lb[:, -n:]
        return float((la - lb).abs().max())
    finally:
        a.model.train(), b.model.train()


def bench_train_step(cfg, variants: dict[str, Variant], batch: dict, device: torch.device,
                     peft_note: str | None, logit_diffs: dict[str, float]) -> tuple[dict, dict]:
    fns = {name: (lambda k, v=v: v.step(batch)) for name, v in variants.items()}
    other: dict[str, list] = {}
    times = round_robin(fns, int(cfg.repeats), int(cfg.warmup), device, int(cfg.steps_per_sample), other)
    ref = summarise(times[REFERENCE], 1000)
    rows = {}
    for name, v in variants.items():
        s = summarise(times[name], 1000)
        c = compare(s, ref)
        rows[name] = {"label": v.label, "trainable_params": v.trainable, "step_ms": s,
                      "ratio_to_frozen": s["median"] / ref["median"],
                      "paired_ratio_min": c["paired_min"], "paired_ratio_max": c["paired_max"]}
    train = {"unit": "ms", "reference": REFERENCE, "batch_size": int(cfg.batch_size), "seq_len": int(cfg.seq_len),
             "repeats": int(cfg.repeats), "warmup": int(cfg.warmup), "steps_per_sample": int(cfg.steps_per_sample),
             "other_processes_cpu_share": load_summary(other), "rows": rows}
    peft_rows: dict = {}
    if peft_note:
        peft_rows["skipped"] = peft_note
    for name in variants:
        if not name.startswith(TWIN_PREFIX):
            continue
        arm = name[len(TWIN_PREFIX):]
        ours, theirs = rows[arm]["step_ms"], rows[name]["step_ms"]
        c = compare(ours, theirs)
        peft_rows[arm] = {"label": variants[arm].label, "ours_ms": ours, "peft_ms": theirs,
                          "ratio": ours["median"] / theirs["median"],
                          "paired_ratio_min": c["paired_min"], "paired_ratio_max": c["paired_max"],
                          "trainable_ours": variants[arm].trainable, "trainable_peft": variants[name].trainable,
                          "max_abs_logit_diff": logit_diffs[arm]}
    if peft_rows:
        import importlib.metadata as md

        try:
            peft_rows["peft_version"] = md.version("peft")
        except md.PackageNotFoundError:
            pass
    return train, peft_rows
