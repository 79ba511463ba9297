"""The targets the benchmark is judged by, and its Markdown report."""
from __future__ import annotations


from lora_lab.bench.timing import DISTURBED, OtherLoad
from lora_lab.bench.variants import label


# (section, key, label, comparison, threshold): the figures the benchmark is judged by.
TARGETS = (
    ("train_step", "lora_r8", "LoRA r=8 step / frozen-backbone limit", "<=", 1.10),
    ("train_step", "houlsby", "Houlsby adapters step / frozen-backbone limit", "<=", 1.15),
    ("train_step", "pfeiffer", "Pfeiffer adapter step / frozen-backbone limit", "<=", 1.15),
    ("peft", "r8", "ours / PEFT, LoRA r=8 step", "<=", 1.00),
    ("inference", "merged", "LoRA merged / base inference", "<=", 1.02),
    ("data_path", "ratio", "per-batch / fixed-length padding tokens/s", ">=", 1.5),
    ("startup", "warm", "warm-cache start-up to first step, fresh process (s)", "<=", 5.0),
    ("startup", "warm_server", "warm-cache start-up to first step, warm server (s)", "<=", 5.0),
)


def _seconds(value) -> str:
    return "" if value is None else f"{value:.2f}"


def check_targets(results: dict) -> list[dict]:
    out = []
    for section, key, text, op, threshold in TARGETS:
        value = results.get(section, {})
        if section == "train_step":
            value = value.get("rows", {}).get(key, {}).get("ratio_to_frozen")
        elif section == "peft":
            value = value.get(key, {}).get("ratio")
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


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
               for s in ("train_step", "inference", "data_path"))


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
    parts.append("### 2. Ours vs PEFT LoRA (same model, rank, targets, alpha, dropout 0; head trains in both)")
    rows = []
    for key, r in pf.items():
        if isinstance(r, dict) and "ratio" in r:
            target, verdict = _target(t, "peft", key)
            rows.append([key, f"{r['ours_ms']['median']:.1f} ({_range(r['ours_ms'])})",
                         f"{r['peft_ms']['median']:.1f} ({_range(r['peft_ms'])})", f"{r['ratio']:.3f}",
                         f"{r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f}", target, verdict])
    if rows:
        parts.append(markdown_table(["rank", "ours ms", f"PEFT {pf.get('peft_version', '')} ms", "ours / PEFT",
                                     "per-round", "target", "result"], rows))
    if pf.get("skipped"):
        parts.append(f"Skipped: {pf['skipped']}")
    inf = results.get("inference")
    if inf:
        rows = []
        for name, r in inf["rows"].items():
            key = {"lora_merged": "merged"}.get(name, "")
            target, verdict = _target(t, "inference", key) if key else ("", "")
            rows.append([name, f"{r['latency_ms']['median']:.1f}", _range(r["latency_ms"]),
                         f"{r['ratio_to_base']:.3f}", f"{r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f}",
                         target, verdict])
        parts += [f"### 3. Inference latency (eval, no grad), batch {inf['batch_size']} x {inf['seq_len']}, "
                  f"LoRA r={inf['r']}; merged vs unmerged logits differ by at most "
                  f"{inf['merged_vs_unmerged_max_abs_logit_diff']:.1e}",
                  markdown_table(["model", "ms", "min–max", "/ base", "per-round", "target", "result"], rows),
                  _load_line(inf)]
    mem = results["memory"]
    rows = []
    cuda = any("cuda_peak_allocated_mb" in m for m in mem.values())
    for name, m in mem.items():
        row = [label(name, results["config"]["lora_targets"]), f"{m['weights_mb']:.1f}", f"{m['gradients_mb']:.1f}",
               f"{m['optimizer_state_mb']:.1f}", f"{m['activations_saved_mb']:.1f}", f"{m['total_mb']:.1f}"]
        if cuda:
            row += [f"{m['cuda_activations_mb']:.1f}", f"{m['cuda_peak_allocated_mb']:.1f}"]
        rows.append(row)
    header = ["method", "weights MiB", "gradients", "AdamW state", "saved activations", "total"]
    if cuda:
        header += ["CUDA activations (peak - rest)", "CUDA peak"]
    parts += ["### 4. Memory of one training step (MiB; from the tensors: parameters, .grad, optimiser state, "
              "tensors saved for backward)", markdown_table(header, rows)]
    dp = results.get("data_path")
    if dp and "rows" in dp:
        rows = []
        for mode, r in dp["rows"].items():
            target, verdict = _target(t, "data_path", "ratio") if mode == "batch" else ("", "")
            rows.append([mode, f"{r['padded_length_mean']:.1f}", f"{100 * r['padding_fraction']:.0f} %",
                         f"{r['tokens_per_s']:.0f}", f"{r['step_ms']['median']:.1f} ({_range(r['step_ms'])})",
                         f"{dp['ratio']:.2f}" if mode == "batch" else "1", target, verdict])
        parts += [f"### 5. Data path: LoRA r={dp['r']} training on real data, {dp['steps']} batches of "
                  f"{dp['batch_size']} ({dp['tokens_per_batch_mean']:.0f} real tokens per batch on average)",
                  markdown_table(["padding", "padded length", "padding", "tokens/s", "step ms (min–max)",
                                  "ratio", "target", "result"], rows), _load_line(dp)]
    elif dp:
        parts.append(f"### 5. Data path skipped: {dp.get('skipped') or dp.get('error')}")
    st = results.get("startup")
    if st and "warm" in st:
        target, verdict = _target(t, "startup", "warm")
        rows = []
        for name, text in (("cold", "cold (empty data cache), fresh process"),
                           ("warm", "warm (tokenised data cached), fresh process"),
                           ("warm_server", "warm, through a warm `lora-lab-server`")):
            if name not in st:
                continue
            target, verdict = _target(t, "startup", name) if name != "cold" else ("", "")
            low, high = st[f"{name}_range"]
            rows.append([text, f"{st[name]:.2f}", f"{low:.2f}–{high:.2f}", _seconds(st[f"{name}_job"]),
                         f"{st[f'{name}_wall']:.1f}", target, verdict])
        floor = st.get("floor")
        if floor:
            rows.append(["bare process (torch + transformers, tokenizer, model, 1 step)",
                         f"{floor['first_step']:.2f}", "", "", "", "", ""])
        parts += [f"### 6. Sweep overhead: command start to first training step of `{st['command']}`, "
                  f"median of {st['repeats']} (each kind in turn)",
                  markdown_table(["run", "command start to first step s", "min–max", "job start to first step s",
                                  "whole run wall s", "target", "result"], rows)]
        if "server_ready_s" in st:
            parts.append(f"The warm server took {st['server_ready_s']:.1f} s to start (its imports), once.")
        if floor:
            parts.append("Bare process, seconds since its start: torch imported {import_torch:.2f}, tokenizer "
                         "loaded {tokenizer_loaded:.2f}, model loaded {model_loaded:.2f}, first step done "
                         "{first_step:.2f}.".format(**floor))
    elif st:
        parts.append(f"### 6. Start-up skipped: {st.get('skipped') or st.get('error')}")
    sub = results.get("subspace")
    if sub and "ratio" in sub:
        parts += ["### 7. Subspace analysis (analysis.bench_subspace): SVD of ΔW = B A",
                  markdown_table(["d", "r", "dense SVD s", "factored ms", "speed-up"],
                                 [[sub.get("d"), sub.get("r"), f"{sub.get('dense_s', float('nan')):.3f}",
                                   f"{1000 * sub.get('factored_s', float('nan')):.2f}", f"{sub['ratio']:.0f}x"]])]
    elif sub:
        parts.append(f"### 7. Subspace analysis skipped: {sub.get('skipped')}")
    rows = [[x["target"], f"{x['op']} {x['threshold']:g}", "—" if x["value"] is None else f"{x['value']:.3f}",
             x["result"]] for x in t]
    parts += ["### Targets", markdown_table(["figure", "target", "measured (median)", "result"], rows)]
    if disturbed_samples(results):
        parts.append(f"WARNING: {disturbed_samples(results)} timed samples were disturbed by other processes "
                     "(see the sections above); the timings are not reliable.")
    return "\n\n".join(parts) + "\n"
