"""The targets the benchmark is judged by, and its Markdown report."""
from __future__ import annotations

from lora_lab.markdown import markdown_table
from lora_lab.runtime.timing import DISTURBED, OtherLoad

# (section, key, label, comparison, threshold): the figures the benchmark is judged by.
TARGETS = (
    ("train_step", "lora_r8", "LoRA r=8 step / frozen-backbone limit", "<=", 1.10),
    ("train_step", "houlsby", "Houlsby adapters step / frozen-backbone limit", "<=", 1.15),
    ("train_step", "pfeiffer", "Pfeiffer adapter step / frozen-backbone limit", "<=", 1.15),
    ("peft", "lora_r8", "ours / PEFT, LoRA r=8 step", "<=", 1.00),
    ("peft", "dora", "ours / PEFT, DoRA r=8 step", "<=", 1.00),
    ("peft", "ia3", "ours / PEFT, (IA)³ step", "<=", 1.00),
    ("inference", "merged", "merged / base inference", "<=", 1.02),
    ("checkpoint", "lora_r8", "checkpoint overhead per step (%), LoRA r=8, default interval", "<=", 2.0),
)


def check_targets(results: dict) -> list[dict]:
    out = []
    for section, key, text, op, threshold in TARGETS:
        value = results.get(section, {})
        if section == "train_step":
            value = value.get("rows", {}).get(key, {}).get("ratio_to_frozen")
        elif section == "peft":
            value = value.get(key, {}).get("ratio")
        elif section == "checkpoint":
            overhead = value.get("rows", {}).get(key, {}).get("overhead")
            value = None if overhead is None else 100 * overhead
        else:
            value = value.get(key)
        passed = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        out.append({"section": section, "key": key, "target": text, "op": op, "threshold": threshold,
                    "value": value, "result": {None: "n/a", True: "PASS", False: "FAIL"}[passed]})
    return out


def _target(targets: list[dict], section: str, key: str) -> tuple[str, str]:
    for t in targets:
        if t["section"] == section and t["key"] == key:
            return f"{t['op']} {t['threshold']:g}", t["result"]
    return "", ""


def _range(s: dict, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['min'])}–{fmt.format(s['max'])}"


def _load_line(section: dict) -> str:
    load = section.get("other_processes_cpu_share", {})
    if not load.get("available"):
        return (f"Other processes' CPU use: not measured (samples shorter than {OtherLoad.MIN_SPAN_S} s, "
                "or no /proc/stat).")
    line = (f"Other processes' share of the CPUs during the timed samples: median {100 * load['median']:.0f} %, "
            f"max {100 * load['max']:.0f} %.")
    if load["disturbed_samples"]:
        line += (f" WARNING: {load['disturbed_samples']} of {load['samples']} samples ran while other processes "
                 f"used more than {100 * DISTURBED:.0f} % of the CPUs; re-run on a quiet machine.")
    return line


def disturbed_samples(results: dict) -> int:
    return sum(results.get(s, {}).get("other_processes_cpu_share", {}).get("disturbed_samples", 0)
               for s in ("train_step", "inference"))


def _memory_table(mem: dict) -> str:
    rows = []
    cuda = any("cuda_peak_allocated_mb" in m for m in mem.values())
    for m in mem.values():
        row = [m["label"], f"{m['weights_mb']:.1f}", f"{m['gradients_mb']:.1f}",
               f"{m['optimizer_state_mb']:.1f}", f"{m['activations_saved_mb']:.1f}", f"{m['total_mb']:.1f}"]
        if cuda:
            row += [f"{m['cuda_activations_mb']:.1f}", f"{m['cuda_peak_allocated_mb']:.1f}"]
            if "cuda_own_peak_allocated_mb" in m:
                row += [f"{m['cuda_own_peak_allocated_mb']:.1f} / {m['cuda_own_peak_reserved_mb']:.1f}"]
        rows.append(row)
    header = ["method", "weights MiB", "gradients", "AdamW state", "saved activations", "total"]
    if cuda:
        header += ["CUDA activations (peak - rest)", "CUDA peak"]
        if any("cuda_own_peak_allocated_mb" in m for m in mem.values()):
            header += ["CUDA peak of this variant alone, allocated / reserved"]
    return markdown_table(header, rows)


def _sharded_memory_table(rows: dict) -> str:
    body = [[r["label"], str(r["world_size"]), r["strategy"], f"{r['weights_mb']:.2f}", f"{r['gradients_mb']:.2f}",
             f"{r['optimizer_state_mb']:.2f}", f"{r['gathered_mb']:.2f}", f"{r['total_mb']:.2f}"]
            for r in rows.values()]
    return markdown_table(["method", "ranks", "strategy", "weights", "gradients", "AdamW state",
                           "gathered whole", "total per rank"], body)


def render(results: dict) -> str:
    t = results["targets"]
    env = results["setup"]
    parts = [f"## lora-lab-bench: {env['model']} on {env['device']} ({env['threads']} threads), "
             f"{env.get('precision', 'fp32')}, torch {env['torch']}",
             f"Load average (1 min) before {env['loadavg_before'][0]:.2f}, after {env['loadavg_after'][0]:.2f}; "
             "figures are medians over the timed rounds, with their min–max; ratios are ratios of medians, "
             "'per-round' the range of the ratios within each round."]
    tr = results["train_step"]
    rows = []
    for name, r in tr["rows"].items():
        target, verdict = _target(t, "train_step", name)
        rows.append([r["label"], f"{r['trainable_params']:,}", f"{r['step_ms']['median']:.1f}",
                     _range(r["step_ms"]), f"{r['ratio_to_frozen']:.3f}",
                     f"{r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f}", target, verdict])
    parts += [f"### 1. Training step (fwd + bwd + AdamW), batch {tr['batch_size']} x {tr['seq_len']} tokens, "
              f"{tr['repeats']} rounds after {tr['warmup']} warm-up",
              markdown_table(["method", "trainable", "step ms", "min–max", "x frozen limit", "per-round x",
                              "target", "result"], rows), _load_line(tr)]
    pf = results.get("peft", {})
    parts.append("### 2. Ours vs PEFT (same method, settings and weights; head trains in both)")
    rows = []
    for key, r in pf.items():
        if isinstance(r, dict) and "ratio" in r:
            target, verdict = _target(t, "peft", key)
            rows.append([r["label"], f"{r['ours_ms']['median']:.1f} ({_range(r['ours_ms'])})",
                         f"{r['peft_ms']['median']:.1f} ({_range(r['peft_ms'])})", f"{r['ratio']:.3f}",
                         f"{r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f}",
                         f"{r['max_abs_logit_diff']:.1e}", target, verdict])
    if rows:
        parts.append(markdown_table(["method", "ours ms", f"PEFT {pf.get('peft_version', '')} ms", "ours / PEFT",
                                     "per-round", "max |Δ logit|", "target", "result"], rows))
    if pf.get("skipped"):
        parts.append(f"Skipped: {pf['skipped']}")
    parts += ["### 3. Memory of one training step (MiB; from the tensors: parameters, .grad, optimiser state, "
              "tensors saved for backward)", _memory_table(results["memory"])]
    if results.get("memory_options"):
        parts += ["### 3b. Fitting a bigger model: bf16 or 4-bit frozen base, gradient checkpointing (MiB; with "
                  "checkpointing, backward recomputes one layer at a time on top of the saved activations)",
                  _memory_table(results["memory_options"])]
    for row in (results.get("memory_options_skipped") or {}).values():
        parts.append(f"Skipped: {row['label']}: {row['reason']}.")
    if results.get("sharded_memory"):
        parts += ["### 3c. Training state per rank, DDP vs FSDP (MiB; predicted from the tensors: weights, "
                  "gradients, AdamW state; FSDP shards them over the ranks and gathers one block or the root "
                  "whole at a time; activations not included)", _sharded_memory_table(results["sharded_memory"])]
    inf = results.get("inference")
    if inf:
        rows = []
        for name, r in inf["rows"].items():
            target, verdict = _target(t, "inference", name) if name == "merged" else ("", "")
            rows.append([name, f"{r['latency_ms']['median']:.1f}", _range(r["latency_ms"]),
                         f"{r['ratio_to_base']:.3f}", f"{r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f}",
                         target, verdict])
        parts += [f"### 4. Inference latency (eval, no grad), batch {inf['batch_size']} x {inf['seq_len']}, "
                  f"{inf['label']}; merged vs unmerged logits differ by at most "
                  f"{inf['merged_vs_unmerged_max_abs_logit_diff']:.1e}",
                  markdown_table(["model", "ms", "min–max", "/ base", "per-round", "target", "result"], rows),
                  _load_line(inf)]
    ck = results.get("checkpoint")
    if ck:
        rows = []
        for name, r in ck["rows"].items():
            target, verdict = _target(t, "checkpoint", name)
            rows.append([r["label"], f"{r['trainable_params']:,}", f"{r['step_ms']:.1f}",
                         f"{r['checkpoint_ms']:.1f} ({r['checkpoint_ms_min']:.1f}–{r['checkpoint_ms_max']:.1f})",
                         f"{r['checkpoint_mb']:.1f}", f"{100 * r['overhead']:.2f} %", target, verdict,
                         f"{r['state_mb']:.2f}", f"{r['state_mb'] + r['delta_w_v2_mb']:.2f}"])
        parts += [f"### 5. Checkpointing: one write (fsync, rename) vs one step, {ck['repeats']} rounds; "
                  f"overhead per step every {ck['every']} steps",
                  markdown_table(["method", "trainable", "step ms", "checkpoint ms (min–max)", "file MiB",
                                  "overhead / step", "target", "result", "run keeps MiB",
                                  "record v2 kept MiB (+ ΔW, W0)"], rows)]
    rows = [[x["target"], f"{x['op']} {x['threshold']:g}", "—" if x["value"] is None else f"{x['value']:.3f}",
             x["result"]] for x in t]
    parts += ["### Targets", markdown_table(["figure", "target", "measured (median)", "result"], rows)]
    if disturbed_samples(results):
        parts.append(f"WARNING: {disturbed_samples(results)} timed samples were disturbed by other processes "
                     "(see the sections above); the timings are not reliable.")
    return "\n\n".join(parts) + "\n"
