"""Benchmark of the subspace analysis at LLaMA-7B shapes, on synthetic factors built in memory.

    lora-lab-bench-subspace            # d=4096, r=64, 32 layers x (q, v), r=8 vs r=64
    lora-lab-bench-subspace --quick    # small shapes, a few seconds

1. The SVD of one ΔW = B @ A (d x r times r x d): from the factors (QR of B and A^T, SVD of the r x r
   core, float64) against a dense torch.linalg.svd of the formed d x d product (float32, the cheaper
   dtype); medians of repeats and their ratio.
2. The whole analysis of two LoRA runs (r_small vs r on q and v of every layer, W0 random and shared):
   spectra, effective ranks, phi with its random baseline and Table 7 (ΔW and random columns, one
   product W0 @ V per module), median of repeats; with ``--with-w-row`` once more with Table 7's W
   column (a top-r SVD of every W0, randomized above 1024) and one random draw.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from lora_lab.analysis.subspace import AnalysisOptions, RunDeltas, analyse_runs, factored_svd
from lora_lab.methods.base import DeltaW


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def synthetic_runs(d: int, ranks: Sequence[int], layers: int, seed: int = 0) -> list[RunDeltas]:
    """LoRA runs on q_proj and v_proj of ``layers`` layers; every module has its own random W0 (shared
    by the runs, as runs from one base model are) and A, B factors with a few directions in common."""
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{layer}.self_attn.{t}" for layer in range(layers) for t in ("q_proj", "v_proj")]
    bound = math.sqrt(3.0 / d)  # uniform with the variance of N(0, 1/d); cheaper to draw than Gaussian
    bases = {n: torch.empty(d, d).uniform_(-bound, bound, generator=g) for n in names}
    common = {n: torch.randn(2, d, generator=g) for n in names}
    runs = []
    for r in ranks:
        deltas = {}
        for n in names:
            A = torch.randn(r, d, generator=g) / math.sqrt(d)
            A[:2] += common[n] / math.sqrt(d)
            B = torch.randn(d, r, generator=g) * 1e-3
            deltas[n] = DeltaW(B=B, A=A, base=bases[n], kind="lora")
        runs.append(RunDeltas.from_deltas(f"lora r={r}", deltas, rank=r))
    return runs


def run_benchmark(d: int, r: int, r_small: int, layers: int, repeats: int, dense_repeats: int,
                  factored_repeats: int, w_row: bool = False, out=print) -> dict:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(d, r, generator=g)
    A = torch.randn(r, d, generator=g)
    factored = timed(lambda: factored_svd(B, A), factored_repeats)
    last = {}

    def dense_svd():
        last["S"] = torch.linalg.svd(B @ A, full_matrices=False).S

    dense = timed(dense_svd, dense_repeats, warmup=0)
    s_fact = factored_svd(B, A).S
    s_dense = last["S"][:r].double()
    agreement = float(((s_fact - s_dense).abs() / s_dense[0]).max())
    t_fact, t_dense = statistics.median(factored), statistics.median(dense)
    ratio = t_dense / t_fact
    out(f"SVD of one ΔW = B @ A, d={d}, r={r}:")
    out(f"  factored (QR of B and A^T, {r}x{r} core, float64): {t_fact * 1e3:.2f} ms (median of {factored_repeats})")
    out(f"  dense torch.linalg.svd of B @ A (float32):          {t_dense:.3f} s (median of {dense_repeats})")
    out(f"  speed-up: {ratio:.0f}x   (top-{r} singular values agree to {agreement:.1e} of sigma_1)")

    t0 = time.perf_counter()
    runs = synthetic_runs(d, (r_small, r), layers)
    t_build = time.perf_counter() - t0
    n_mod = len(runs[0].shapes)
    opts = AnalysisOptions(w_row=False)
    whole = timed(lambda: analyse_runs(runs, [(0, 1)], opts, progress=False), repeats)
    t_whole = statistics.median(whole)
    out(f"Whole analysis, {layers} layers x (q, v) = {n_mod} matrices per run, r={r_small} vs r={r}, d={d} "
        f"(synthetic data built in {t_build:.1f} s):")
    out(f"  spectra + effective rank + phi + random baseline + Table 7 (ΔW, random expectation): "
        f"{t_whole:.2f} s (median of {repeats})")
    result = {"d": d, "r": r, "r_small": r_small, "layers": layers, "factored_times": factored,
              "dense_times": dense, "factored_s": t_fact, "dense_s": t_dense, "ratio": ratio,
              "agreement": agreement, "whole_times": whole, "whole_s": t_whole}
    if w_row:
        t0 = time.perf_counter()
        res = analyse_runs(runs, [(0, 1)], AnalysisOptions(w_row=True, random_draw=True), progress=False)
        t_w = time.perf_counter() - t0
        row = next(t for t in res.table7 if t["run"] == f"lora r={r}")
        out(f"  the same with Table 7's W column (top-{r} SVD of each W0, once per module) and a random draw: "
            f"{t_w:.2f} s (1 run)")
        out(f"  e.g. {row['module']}, r={r}: ||U^T W V||_F = {row['proj_delta']:.4f} (ΔW) / {row['proj_w']:.3f} (W) / "
            f"{row['proj_random']:.4f} (random, expected; one draw {row['proj_random_draw']:.4f}), "
            f"amplification {row['amplification']:.3g}")
        result["whole_with_w_s"] = t_w
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-lab-bench-subspace", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (d=512, 2 layers) for a smoke test")
    p.add_argument("--d", type=int, default=None, help="hidden size (default 4096; 512 with --quick)")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--r-small", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="default 32; 2 with --quick")
    p.add_argument("--repeats", type=int, default=None, help="repeats of the whole analysis (default 3)")
    p.add_argument("--dense-repeats", type=int, default=None, help="repeats of the dense SVD (default 3)")
    p.add_argument("--factored-repeats", type=int, default=20)
    p.add_argument("--with-w-row", action="store_true",
                   help="also time the analysis with Table 7's W column (about 0.5 s per 4096 x 4096 W0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p


def measure(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark the command line describes; the results as a dict."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    d = args.d or (512 if quick else 4096)
    layers = args.layers or (2 if quick else 32)
    repeats = args.repeats or (2 if quick else 3)
    dense_repeats = args.dense_repeats or 3
    if min(d, args.r, args.r_small, layers, repeats, dense_repeats, args.factored_repeats) < 1 or args.r > d:
        print("error: sizes and repeats must be >= 1 and r <= d", file=sys.stderr)
        raise SystemExit(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return run_benchmark(d, args.r, args.r_small, layers, repeats, dense_repeats, args.factored_repeats,
                         w_row=args.with_w_row or quick)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: prints the results (exit status 0)."""
    measure(argv)


if __name__ == "__main__":
    main()
