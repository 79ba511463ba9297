"""Subspace report over saved runs and PEFT adapters: spectra, effective ranks, phi heatmaps and the paper's Table 7.

    lora-lab-subspace SOURCE [SOURCE ...] --out REPORT_DIR [--base MODEL] [options]

Each SOURCE is a completed lora_lab run (record.json and trainable.safetensors, or delta_w.safetensors), a PEFT LoRA adapter
folder (adapter_config.json and adapter_model.safetensors) or the Hub id of one (``user/repo``); all
are checked before anything is analysed (``sources``), and the report says where each ΔW comes from
(a run's record "files": the best epoch; records of schema version 1: the last epoch). Modules shared
by all sources are analysed, one at a time, streamed from the safetensors files, LoRA factors never
multiplied out. phi compares pairs of sources (``--pairs``), so it needs two or more; one can be
analysed with ``--analyses spectra,table7``. Table 7 needs W0: runs carry it, PEFT adapters get it
from ``--base``; without it the report leaves Table 7 out and says why.
Writes PNG figures, CSV + Markdown tables, phi.safetensors and a report.md that links them.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_lab.analysis import subspace_plots as plots
from lora_lab.analysis.drift import DEFAULT_TEXTS, DRIFT_DATA, default_drift_data, held_out_texts, run_drift
from lora_lab.analysis.sources import Sources, check_same_base, load_sources, run_label  # noqa: F401 - run_label: API
from lora_lab.analysis.subspace import (
    ANALYSES,
    BASES,
    SIDES,
    AnalysisOptions,
    AnalysisResult,
    RunDeltas,
    analyse_runs,
    make_pairs,
    short_type_names,
)
from lora_lab.errors import ConfigError
from lora_lab.markdown import markdown_table as format_markdown
from lora_lab.runtime.records import DeltaWeightsFile, save_tensors
from lora_lab.runtime.tracking import Tracker

MAX_HEATMAP_PANELS = 32
NEEDS_W0 = ("table7", "intruders")  # analyses that read the weights before training


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
# delta_w.safetensors (runs before schema version 3) read one module at a time (memory-mapped), with shapes
# known and checked up front.
DeltaFile = DeltaWeightsFile


def load_runs(run_dirs: Sequence[str | Path]) -> tuple[list[RunDeltas], list[dict | None], list[str]]:
    """The runs with their ΔW, their records (None for a PEFT adapter), and the labels of runs whose
    method changed no weight matrix (ΔW = 0 everywhere, e.g. BitFit), which are left out. Every source
    is checked before any is analysed; ``load_sources`` says more about each."""
    sources = load_sources(run_dirs)
    return sources.runs, [s.record for s in sources.analysed], sources.unchanged


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    return str(v)


def write_table(out: Path, stem: str, columns: list[str], rows: list[list]) -> tuple[Path, Path, str]:
    """CSV (full precision) and Markdown (4 significant digits); returns both paths and the Markdown."""
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow(["x".join(map(str, v)) if isinstance(v, tuple) else ("" if v is None else v) for v in row])
    md = markdown_table(columns, rows)
    md_path.write_text(md + "\n")
    return csv_path, md_path, md


def markdown_table(columns: list[str], rows: list[list]) -> str:
    return format_markdown(columns, rows, cell=lambda v: (v if isinstance(v, str) else _fmt(v)).replace("|", "\\|"))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x"


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _select_layers(layers: list, wanted: list[int] | None) -> list:
    if wanted is not None:
        return [layer for layer in layers if layer in wanted]
    if len(layers) <= MAX_HEATMAP_PANELS:
        return layers
    step = (len(layers) - 1) / (MAX_HEATMAP_PANELS - 1)
    return [layers[i] for i in sorted({round(i * step) for i in range(MAX_HEATMAP_PANELS)})]


def write_report(res: AnalysisResult, run_dirs: Sequence[str | Path], out: Path,
                 heatmap_layers: list[int] | None = None, elapsed: float | None = None,
                 epochs: Sequence[str | None] | None = None, table7_missing: str | None = None,
                 source_header: str = "run directory") -> dict:
    """report.md with its figures and tables. ``run_dirs``: where each source is (run directory, adapter
    folder or Hub id); ``epochs``: where each ΔW comes from (a run's epoch, how an adapter's ΔW is
    formed); ``table7_missing``: why Table 7 was not computed, when it was asked for; ``source_header``:
    the name of the column of ``run_dirs``."""
    out.mkdir(parents=True, exist_ok=True)
    opts = res.options
    short = short_type_names(res.types())
    images: list[Path] = []
    tables: dict[str, tuple[list[str], list[list]]] = {}
    md = ["# Subspace analysis of ΔW (LoRA paper, Section 7)", ""]
    epochs = list(epochs) if epochs is not None else [None] * len(res.labels)
    md += ["Runs:", "", markdown_table(["#", "label", "ΔW from", source_header],
                                       [[i + 1, lab, epoch or "-", str(d)] for i, (lab, epoch, d)
                                        in enumerate(zip(res.labels, epochs, run_dirs))]), ""]
    md += [f"Modules analysed: {len(res.modules)} (shared by all runs), matrix types: "
           + ", ".join(f"`{t}`" for t in res.types()) + ".", ""]
    settings = [f"analyses {','.join(opts.analyses)}", f"energy threshold {opts.energy:g}", f"seed {opts.seed}"]
    if res.pairs:
        settings += [f"phi basis {res.basis!r} ({'LoRA factor A/B' if res.basis == 'factor' else 'singular vectors of ΔW'})",
                     f"side {opts.side!r} ({'input / row space' if opts.side == 'right' else 'output / column space'})"]
    md += ["Settings: " + "; ".join(settings) + ".", ""]
    if elapsed is not None:
        md += [f"Computation time: {elapsed:.2f} s.", ""]
    for label, names in res.unmatched.items():
        md += [f"Not analysed ({label} only has them): {len(names)} module(s), e.g. `{names[0]}`.", ""]

    if "spectra" in opts.analyses:
        md += _spectra_section(res, out, short, images, tables, plots)
    if res.pairs:
        md += _phi_section(res, out, short, images, tables, plots, heatmap_layers)
    if "table7" in opts.analyses:
        md += _table7_section(res, out, short, tables)
    elif table7_missing:
        md += [_TABLE7_TITLE, "", f"Not computed: {table7_missing}", ""]
    if "intruders" in opts.analyses:
        md += _intruders_section(res, out, short, tables)
    elif table7_missing and "intruders" in table7_missing:
        md += ["## Intruder dimensions", "", f"Not computed: {table7_missing}", ""]
    if res.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    (out / "report.md").write_text("\n".join(md))
    return {"images": images, "tables": tables, "report": out / "report.md"}


def _spectra_section(res, out, short, images, tables, plots) -> list[str]:
    opts = res.options
    md = ["## Singular values and effective rank", "",
          f"Effective rank: the fewest singular values holding {opts.energy:.0%} of ||ΔW||_F^2. "
          "Factored ΔW (LoRA) has all its singular values; a dense ΔW larger than "
          "1024 has only its top directions (randomized SVD), and '>k' means they do not reach the threshold.", ""]
    cols = ["run", "module", "layer", "type", "shape", "kind", "k", "effective_rank", "sigma_1",
            "top1_energy_share", "delta_norm"]
    rows = []
    for s in res.spectra:
        S = s["S"]
        er = s["effective_rank"]
        top = float(S[0]) if S.numel() else 0.0
        rows.append([s["run"], s["module"], s["layer"], short[s["mtype"]], s["shape"], s["kind"], s["k"],
                     er if er is not None else f">{s['k']}", top,
                     top * top / s["delta_norm"] ** 2 if s["delta_norm"] > 0 else None, s["delta_norm"]])
    write_table(out, "effective_rank", cols, rows)
    tables["effective_rank"] = (cols, rows)
    agg_cols = ["run", "type", "layers", "mean effective rank", "min", "max", "mean ‖ΔW‖_F"]
    agg = []
    for label in res.labels:
        for mtype in res.types():
            sel = [s for s in res.spectra if s["run"] == label and s["mtype"] == mtype]
            ers = [s["effective_rank"] for s in sel if s["effective_rank"] is not None]
            agg.append([label, short[mtype], len(sel), _mean(ers), min(ers) if ers else None,
                        max(ers) if ers else None, _mean([s["delta_norm"] for s in sel])])
    md += [markdown_table(agg_cols, agg), "", "Per matrix: [effective_rank.md](effective_rank.md), "
           "[effective_rank.csv](effective_rank.csv).", ""]
    for i, label in enumerate(res.labels):
        series = defaultdict(list)
        for s in res.spectra:
            if s["run"] == label:
                series[short[s["mtype"]]].append((s["layer"], s["S"]))
        path = plots.spectra_plot(dict(series), out / f"spectra_run{i + 1}.png", f"Singular values of ΔW: {label}")
        images.append(path)
        md += [f"![spectra {label}]({path.name})", ""]
    return md


def _phi_section(res, out, short, images, tables, plots, heatmap_layers) -> list[str]:
    opts = res.options
    md = ["## Subspace similarity phi(i, j)", "",
          "phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) between the top-i directions of the first "
          "run and the top-j directions of the second (1: the smaller subspace lies in the other, 0: orthogonal). "
          "Columns: phi_11 = phi(1, 1); phi_block_mean = mean over i, j <= block; phi_full = phi(k1, k2); "
          "shared_dirs = principal angles with cos^2 > 0.5 between the two whole subspaces; random_block_mean = "
          "the same block for two Gaussian matrices of the same shapes; expected_block_mean = its expectation "
          "i*j / (d*min(i, j)).", ""]
    cols = ["pair", "run1", "run2", "module", "layer", "type", "basis", "side", "d", "k1", "k2", "phi_11",
            "block", "phi_block_mean", "phi_full", "shared_dirs", "random_block_mean", "expected_block_mean"]
    rows = []
    for r in res.phi:
        a, b = res.pairs[r.pair]
        s = r.summary
        rows.append([r.pair + 1, res.labels[a], res.labels[b], r.module, r.layer, short[r.mtype], r.basis, opts.side,
                     s["d"], s["k1"], s["k2"], s["phi_11"], s["block"], s["phi_block_mean"], s["phi_full"],
                     s["shared_dirs"], s["random_block_mean"], s["expected_block_mean"]])
    write_table(out, "phi_summary", cols, rows)
    tables["phi_summary"] = (cols, rows)
    agg_cols = ["pair", "type", "layers", "mean phi_11", "mean phi_block_mean", "mean shared_dirs",
                "random_block_mean", "expected_block_mean"]
    agg = []
    for p in range(len(res.pairs)):
        for mtype in res.types():
            sel = [r.summary for r in res.phi if r.pair == p and r.mtype == mtype]
            agg.append([p + 1, short[mtype], len(sel), _mean([s["phi_11"] for s in sel]),
                        _mean([s["phi_block_mean"] for s in sel]), _mean([s["shared_dirs"] for s in sel]),
                        _mean([s["random_block_mean"] for s in sel]), _mean([s["expected_block_mean"] for s in sel])])
    md += [markdown_table(agg_cols, agg), "", "Per matrix: [phi_summary.md](phi_summary.md), "
           "[phi_summary.csv](phi_summary.csv); all phi matrices: phi.safetensors.", ""]
    tensors = {}
    for p, (a, b) in enumerate(res.pairs):
        md += [f"### Pair {p + 1}: {res.labels[a]} (i) vs {res.labels[b]} (j)", ""]
        for mtype in res.types():
            sel = [r for r in res.phi if r.pair == p and r.mtype == mtype]
            layers = _select_layers([r.layer for r in sel], heatmap_layers)
            panels = [(f"layer {r.layer}" if r.layer is not None else r.module, r.phi) for r in sel if r.layer in layers]
            if not panels:
                continue
            path = plots.phi_heatmaps(panels, out / f"phi_pair{p + 1}_{_slug(short[mtype])}.png",
                                      f"phi({res.labels[a]}, {res.labels[b]}, i, j), ΔW {short[mtype]}",
                                      xlabel=f"j ({res.labels[b]})", ylabel=f"i ({res.labels[a]})")
            images.append(path)
            md += [f"![phi pair {p + 1} {short[mtype]}]({path.name})", ""]
        panels = []
        for mtype in res.types():
            base = res.random.get((p, mtype))
            if base is not None:
                d = base["shape"][0]
                panels.append((f"random, {short[mtype]} (d={d})", base["phi"]))
                tensors[f"pair{p + 1}::random::{mtype}"] = base["phi"].float()
        if panels:
            d, k1, k2 = res.random[(p, res.types()[0])]["shape"] if (p, res.types()[0]) in res.random else (0, 0, 0)
            if d:
                panels.append((f"expected i*j/(d*min(i,j)), d={d}", res.random[(p, res.types()[0])]["expected"]))
            path = plots.phi_heatmaps(panels, out / f"phi_pair{p + 1}_random.png",
                                      "Random Gaussian baseline with the same shapes")
            images.append(path)
            md += [f"![random baseline pair {p + 1}]({path.name})", ""]
        for r in res.phi:
            if r.pair == p:
                tensors[f"pair{p + 1}::{r.module}"] = r.phi.float()
    save_tensors(out / "phi.safetensors", tensors,
                 metadata={"labels": json.dumps(res.labels), "pairs": json.dumps(res.pairs),
                           "basis": res.basis, "side": opts.side})
    return md


_TABLE7_TITLE = "## Table 7: does ΔW amplify directions of W?"


def _table7_section(res, out, short, tables) -> list[str]:
    md = [_TABLE7_TITLE, "",
          "U, V: the top-r left / right singular vectors of ΔW, of W (= W0, the weights before training) or "
          "of a random Gaussian matrix; the columns give ||U^T W V||_F for each, ||W||_F, ||ΔW||_F and the "
          "amplification factor ||ΔW||_F / ||U^T W V||_F (ΔW directions). Random directions are uniformly "
          "distributed, so the random column is the root of E||U^T W V||_F^2 = r^2 ||W||_F^2 / (out * in) "
          "(proj_random_draw: one actual draw, with --random-draw). The paper (GPT-3, layer 48, W_q): "
          "r=4: 0.32 / 21.67 / 0.02, amplification ~21.5; r=64: 1.90 / 37.71 / 0.33, amplification ~2.", ""]
    cols = ["run", "module", "layer", "type", "r", "proj_delta", "proj_w", "proj_random", "proj_random_draw",
            "w_norm", "delta_norm", "amplification"]
    rows = [[t["run"], t["module"], t["layer"], short[t["mtype"]], t["r"], t["proj_delta"], t["proj_w"],
             t["proj_random"], t["proj_random_draw"], t["w_norm"], t["delta_norm"], t["amplification"]]
            for t in res.table7]
    if not rows:
        return md + ["No module had a saved W0; nothing to report.", ""]
    write_table(out, "table7", cols, rows)
    tables["table7"] = (cols, rows)
    agg_cols = ["run", "type", "r", "‖UᵀWV‖ ΔW", "‖UᵀWV‖ W", "‖UᵀWV‖ random", "‖W‖_F", "‖ΔW‖_F",
                "amplification"]
    agg = []
    for label in res.labels:
        for mtype in res.types():
            sel = [t for t in res.table7 if t["run"] == label and t["mtype"] == mtype]
            if sel:
                agg.append([label, short[mtype], sel[0]["r"]] + [_mean([t[k] for t in sel]) for k in
                           ("proj_delta", "proj_w", "proj_random", "w_norm", "delta_norm", "amplification")])
    md += ["Means over layers:", "", markdown_table(agg_cols, agg), "",
           "Per matrix: [table7.md](table7.md), [table7.csv](table7.csv).", ""]
    return md


def _intruders_section(res, out, short, tables) -> list[str]:
    opts = res.options
    md = ["## Intruder dimensions", "",
          f"Of the top {opts.intruder_k} left singular vectors of the tuned matrix W0 + ΔW, those whose largest "
          f"|cosine| with any left singular vector of W0 is below {opts.intruder_threshold:g} (Shuttleworth et al. "
          "2024, Algorithm 1): directions the tuned matrix has and W0 has not. The paper finds them after LoRA "
          "and rarely after full fine-tuning. min_similarity: the lowest of the k best cosines.", ""]
    cols = ["run", "module", "layer", "type", "k", "intruders", "positions", "min_similarity"]
    rows = [[t["run"], t["module"], t["layer"], short[t["mtype"]], t["k"], t["intruders"],
             " ".join(map(str, t["positions"])) or "-", t["min_similarity"]] for t in res.intruders]
    if not rows:
        return md + ["No module had a saved W0; nothing to report.", ""]
    write_table(out, "intruders", cols, rows)
    tables["intruders"] = (cols, rows)
    agg_cols = ["run", "type", "matrices", "with an intruder", "intruders per matrix", "mean min_similarity"]
    agg = []
    for label in res.labels:
        for mtype in res.types():
            sel = [t for t in res.intruders if t["run"] == label and t["mtype"] == mtype]
            if sel:
                agg.append([label, short[mtype], len(sel), sum(t["intruders"] > 0 for t in sel),
                            _mean([t["intruders"] for t in sel]), _mean([t["min_similarity"] for t in sel])])
    md += [markdown_table(agg_cols, agg), "", "Per matrix: [intruders.md](intruders.md), "
           "[intruders.csv](intruders.csv).", ""]
    return md


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-lab-subspace", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="SOURCE",
                   help="completed lora_lab run directories, PEFT LoRA adapter folders (adapter_config.json + "
                        "adapter_model.safetensors) or Hub ids of such adapters (user/repo), mixed freely")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="folder for report.md, figures and tables")
    p.add_argument("--pairs", default="all", choices=["all", "first", "consecutive"],
                   help="which runs phi compares: every pair, the first run against each other, or neighbours")
    p.add_argument("--analyses", default=",".join(ANALYSES),
                   help=f"comma-separated subset of {','.join(ANALYSES)}; phi needs two runs or more; 'drift' "
                        "alone: only --drift, for runs of any methods (no shared matrices needed)")
    p.add_argument("--basis", default="auto", choices=BASES,
                   help="phi from the LoRA factors (A's row space / B's column space, as in the paper), from the "
                        "singular vectors of ΔW (any method), or auto: factor when every run has factors")
    p.add_argument("--side", default="right", choices=SIDES, help="input side (row space) or output side")
    p.add_argument("--energy", type=float, default=0.9, help="energy fraction that defines the effective rank")
    p.add_argument("--dense-dirs", type=int, default=64, help="top directions kept from a dense ΔW")
    p.add_argument("--rank", type=int, default=None,
                   help="Table 7 r for every run (default: the run's method.r, else the factor width, else 8)")
    p.add_argument("--no-w-row", action="store_true",
                   help="skip Table 7's W column (a top-r SVD of every W0, randomized above 1024)")
    p.add_argument("--random-draw", action="store_true",
                   help="Table 7: also project W onto one random draw of directions (costs a pass over W0)")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="W0 for Table 7 of PEFT adapters: a local base-model folder (.safetensors, sharded or not) "
                        "or one .safetensors file; without it Table 7 is left out for them")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="compare (phi) sources whose recorded base models have different names")
    p.add_argument("--block", type=int, default=None, help="phi summary block size (default min(k1, k2))")
    p.add_argument("--intruder-k", type=int, default=10,
                   help="intruder dimensions: top singular vectors of W0 + ΔW examined")
    p.add_argument("--intruder-threshold", type=float, default=0.5,
                   help="intruder dimensions: a vector whose best |cosine| with W0's is below this is one")
    p.add_argument("--drift", action="store_true",
                   help="also measure how far each run moved the model on held-out text: linear CKA of the base and "
                        "trained models' pooled last hidden states (and, for causal-LM runs, both models' "
                        "next-token loss); rebuilds and runs both models")
    p.add_argument("--drift-data", default=None, metavar="NAME",
                   help=f"embedded data set of the held-out text (default: the first of {', '.join(DRIFT_DATA)} "
                        "that no run was trained on)")
    p.add_argument("--drift-texts", type=int, default=DEFAULT_TEXTS, help="held-out texts for --drift")
    p.add_argument("--layers", default=None,
                   help=f"comma-separated layers to draw heatmaps for (default all, at most {MAX_HEATMAP_PANELS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baselines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--wandb", action="store_true", help="also log figures and tables to Weights & Biases")
    p.add_argument("--wandb-mode", default="auto", choices=["auto", "online", "offline", "disabled"])
    p.add_argument("--wandb-project", default="lora_lab")
    return p


def _parse_list(text: str | None, key: str, cast=str) -> list | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ConfigError(key, text, "must be a comma-separated list of integers") from None


def _options(args: argparse.Namespace) -> AnalysisOptions:
    analyses = tuple(_parse_list(args.analyses, "analyses"))
    if "drift" in analyses:  # --analyses ...,drift is --drift
        args.drift, analyses = True, tuple(a for a in analyses if a != "drift")
    return AnalysisOptions(analyses=analyses, basis=args.basis, side=args.side,
                           energy=args.energy, dense_dirs=args.dense_dirs, table7_rank=args.rank,
                           w_row=not args.no_w_row, random_draw=args.random_draw, block=args.block, seed=args.seed,
                           intruder_k=args.intruder_k, intruder_threshold=args.intruder_threshold)


def _table7_without_w0(sources: Sources, opts: AnalysisOptions) -> str | None:
    """Why Table 7 and the intruder dimensions cannot be computed for some sources (PEFT adapters without
    --base), or None. When no source has W0, they are dropped from the analyses: the report keeps what
    needs ΔW alone."""
    lacking = sources.without_w0
    asked = [a for a in NEEDS_W0 if a in opts.analyses]
    if not asked or not lacking:
        return None
    what = "Table 7 needs W0" if "table7" in asked else "The intruder dimensions need W0"
    if len(asked) == 2:
        what += " (the intruder dimensions too)"
    reason = (f"{what}, the base model's weights, which a PEFT adapter does not hold ({', '.join(lacking)}); pass "
              "--base MODEL (a local model folder with .safetensors weights, or one .safetensors file) to compute "
              + ("them" if len(asked) == 2 else "it"))
    if len(lacking) == len(sources.analysed):
        if set(opts.analyses) <= set(NEEDS_W0):
            raise ConfigError("analyses", ",".join(opts.analyses), reason)
        opts.analyses = tuple(a for a in opts.analyses if a not in NEEDS_W0)
    return reason


def run_report(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("threads", args.threads, "must be >= 1")
        torch.set_num_threads(args.threads)
    opts = _options(args)
    if not opts.analyses and args.drift:  # --analyses drift: the models only, no ΔW analysis
        return _drift_only_report(args)
    layers = _parse_list(args.layers, "layers", int)
    if "phi" in opts.analyses and len(args.runs) < 2:  # say so before reading any file
        opts.check([RunDeltas(str(r), {}, None, {}) for r in args.runs], [])
    sources = load_sources(args.runs, base=args.base)
    if args.base is not None and not any(s.kind == "peft" for s in sources.analysed):
        print("note: --base gives W0 to PEFT adapters; run directories name their own base model, so it is not used")
    runs = sources.runs
    out = Path(args.out)
    unchanged = sources.unchanged
    zero_note = (f"ΔW = 0 for every weight matrix of {', '.join(unchanged)}: the method trains no weight "
                 "matrix (e.g. BitFit), so there is nothing to analyse there; left out.") if unchanged else None
    if zero_note:
        print(f"note: {zero_note}")
    if not runs:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"# Subspace analysis of ΔW (LoRA paper, Section 7)\n\n{zero_note}\n")
        return {"images": [], "tables": {}, "report": out / "report.md"}
    if "phi" in opts.analyses and len(runs) < 2:
        opts.analyses = tuple(a for a in opts.analyses if a != "phi")
        print("note: subspace similarity (phi) needs two runs with a non-zero ΔW; skipped")
    pairs = make_pairs(len(runs), args.pairs)
    if "phi" in opts.analyses and not args.allow_base_mismatch:
        check_same_base(sources, pairs)
    no_w0 = _table7_without_w0(sources, opts)
    if no_w0:
        print(f"note: {no_w0}")
    t0 = time.perf_counter()
    res = analyse_runs(runs, pairs, opts, progress=None if not args.no_progress else False)
    elapsed = time.perf_counter() - t0
    res.notes[:0] = sources.notes + ([no_w0 + "."] if no_w0 and set(NEEDS_W0) & set(opts.analyses) else [])
    if zero_note:
        res.notes.append(zero_note)
    analysed = sources.analysed
    all_runs = all(s.kind == "run" for s in analysed)
    written = write_report(res, [s.location for s in analysed], out, layers, elapsed, [s.origin for s in analysed],
                           table7_missing=None if set(NEEDS_W0) & set(opts.analyses) else no_w0,
                           source_header="run directory" if all_runs else "source")
    ranks = _adaptive_ranks_section(sources, written)
    if ranks:
        report = Path(written["report"])
        report.write_text(report.read_text().rstrip("\n") + "\n\n" + "\n".join(ranks))
    if args.drift:
        _add_drift_section(args, sources, written)
    if args.wandb:
        _log_wandb(args, res, sources, written)
    return written


def _drift_only_report(args: argparse.Namespace) -> dict:
    """``--analyses drift``: the drift of each run (any methods, whatever matrices they adapt), no ΔW analysis."""
    sources = load_sources(args.runs, base=args.base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = [[i + 1, s.label, s.location] for i, s in enumerate(sources.items)]
    report = out / "report.md"
    report.write_text("\n".join(["# Drift of each run on held-out text", "", "Runs:", "",
                                  markdown_table(["#", "label", "source"], items), ""]))
    written = {"images": [], "tables": {}, "report": report}
    _add_drift_section(args, sources, written)
    return written


def _adaptive_ranks_section(sources: Sources, written: dict) -> list[str]:
    """The final rank of every matrix of runs that re-allocate ranks while training (AdaLoRA), from their
    records: the rank each matrix ended with, against the initial and target ranks."""
    cols = ["run", "module", "initial rank", "final rank"]
    rows, summary = [], []
    for source in sources.items:
        resolved = (source.record or {}).get("method_resolved") or {}
        if not isinstance(resolved.get("ranks"), dict) or resolved.get("initial_rank") is None:
            continue
        ranks = resolved["ranks"]
        rows += [[source.label, module, resolved["initial_rank"], rank] for module, rank in ranks.items()]
        values = sorted(ranks.values())
        summary.append(f"- {source.label}: initial rank {resolved['initial_rank']}, target (average) "
                       f"{resolved.get('target_rank')}; final ranks {values[0]}-{values[-1]}, "
                       f"{sum(values)} in all over {len(values)} matrices (mean {sum(values) / len(values):.2f}).")
    if not rows:
        return []
    write_table(Path(written["report"]).parent, "adaptive_ranks", cols, rows)
    written["tables"]["adaptive_ranks"] = (cols, rows)
    return ["## Ranks allocated while training (AdaLoRA)", "",
            "AdaLoRA prunes singular values by importance during training (Zhang et al. 2023): the rank each "
            "matrix ended with, from the run's record. Per matrix: [adaptive_ranks.md](adaptive_ranks.md), "
            "[adaptive_ranks.csv](adaptive_ranks.csv).", "", *summary, ""]


def _add_drift_section(args: argparse.Namespace, sources: Sources, written: dict) -> None:
    """Drift of every run (also those whose ΔW is 0: BitFit, head-only), appended to report.md."""
    runs = [s for s in sources.items if s.kind == "run"]
    trained_on = sorted({str(((s.record or {}).get("config") or {}).get("data", {}).get("name")) for s in runs})
    data = args.drift_data or default_drift_data(trained_on)
    texts = held_out_texts(data, args.drift_texts)
    rows = []
    for source in tqdm(runs, desc="drift", unit="run", disable=args.no_progress or len(runs) < 2, leave=False):
        drift = run_drift(source.location, texts)
        rows.append([source.label, drift.cka, drift.lm_loss_before, drift.lm_loss_after,
                     None if drift.lm_loss_before is None else drift.lm_loss_after - drift.lm_loss_before])
    cols = ["run", "CKA base vs trained", "LM loss before", "LM loss after", "LM loss change"]
    out = Path(args.out)
    write_table(out, "drift", cols, rows)
    written["tables"]["drift"] = (cols, rows)
    skipped = [s.label for s in sources.items if s.kind != "run"]
    md = ["## Drift on held-out text", "",
          f"{len(texts)} texts of `{data}` (embedded; a data set the runs were not trained on unless chosen so), read "
          "by the base model and by each trained model. CKA: linear CKA (Kornblith et al. 2019) of the two models' "
          "last hidden states, mean-pooled over each text's tokens: 1 = the same geometry up to rotation and "
          "scale, lower = fine-tuning moved the representations further. LM loss: next-token cross-entropy of "
          "both models, for causal-LM runs only (the forgetting of Biderman et al. 2024).", "",
          markdown_table(cols, rows), ""]
    if not runs:
        md = ["## Drift on held-out text", "", "No lora_lab run among the sources; drift needs a run's model.", ""]
    if skipped:
        md += [f"Not measured (not lora_lab runs, no trained model to rebuild): {', '.join(skipped)}.", ""]
    report = Path(written["report"])
    report.write_text(report.read_text().rstrip("\n") + "\n\n" + "\n".join(md))


def _log_wandb(args, res: AnalysisResult, sources: Sources, written: dict) -> None:
    config = {"runs": [str(r) for r in args.runs], "labels": res.labels,
              "delta_w_from": [s.origin for s in sources.analysed], "analyses": list(res.options.analyses),
              "basis": res.basis, "side": res.options.side, "energy": res.options.energy, "seed": res.options.seed}
    tracker = Tracker.start(config, mode=args.wandb_mode, project=args.wandb_project,
                            name="subspace: " + " vs ".join(res.labels), tags=["subspace"], directory=args.out)
    try:
        for path in written["images"]:
            tracker.log_image(f"subspace/{Path(path).stem}", path)
        for key, (cols, rows) in written["tables"].items():
            tracker.log_table(f"subspace/{key}", cols,
                              [[_fmt(v) if isinstance(v, tuple) else v for v in row] for row in rows])
        summary = {}
        for r in res.phi:
            summary.setdefault(f"subspace/pair{r.pair + 1}/{r.mtype}/phi_11", []).append(r.summary["phi_11"])
        for t in res.table7:
            summary.setdefault(f"subspace/{t['run']}/{t['mtype']}/amplification", []).append(t["amplification"])
        tracker.summary({k: _mean(v) for k, v in summary.items()})
    finally:
        tracker.finish()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = run_report(args)
    except ConfigError as exc:
        print(f"lora-lab-subspace: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written['report']} ({len(written['images'])} figures, {len(written['tables'])} tables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
