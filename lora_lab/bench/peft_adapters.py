"""Benchmark: the subspace report on two LLaMA-7B-shaped PEFT LoRA adapters read from disk, end to end.

    python -m lora_lab.bench.peft_adapters            # d=4096, 32 layers x (q_proj, v_proj), r=8 vs r=64
    python -m lora_lab.bench.peft_adapters --quick    # d=512, 2 layers: a smoke test

Writes two adapter folders as PEFT writes them (adapter_config.json + adapter_model.safetensors, keys
``base_model.model.model.layers.<i>.self_attn.<q|v>_proj.lora_<A|B>.weight``, random factors with two
input directions in common) into a temporary folder, then times ``lora-lab-subspace`` on them through
its ``main``, the command's own code path: reading and checking both adapters, spectra, effective
ranks, phi with its random baseline, figures, tables and report.md (Table 7 is left out: a PEFT
adapter holds no W0). Prints every time and the median of the repeats after one warm-up, then times
the command once more as a new process (interpreter start and imports included).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lora_lab.analysis.subspace_report import main as report_main
from lora_lab.peft.names import CONFIG_FILE, WEIGHTS_FILE

TARGETS = ("q_proj", "v_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_config(r: int, alpha: float) -> dict:
    """The adapter_config.json PEFT writes for LoraConfig(r, lora_alpha, target_modules=q_proj, v_proj)
    on a causal LM (the fields the analysis reads, and the ones PEFT needs to load it)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic/llama-7b-shaped",
            "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def write_adapters(root: Path, d: int, layers: int, ranks: Sequence[int], dtype=torch.float32,
                   seed: int = 0) -> list[Path]:
    """One PEFT adapter folder per rank under ``root``; A's first two rows share directions across them."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    modules = [f"model.layers.{layer}.self_attn.{t}" for layer in range(layers) for t in TARGETS]
    common = {m: torch.randn(2, d, generator=g) for m in modules}
    folders = []
    for r in ranks:
        folder = root / f"llama7b_lora_r{r}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for m in modules:
            A = torch.randn(r, d, generator=g) / math.sqrt(d)
            A[:2] += common[m] / math.sqrt(d)
            tensors[f"base_model.model.{m}.lora_A.weight"] = A.to(dtype)
            tensors[f"base_model.model.{m}.lora_B.weight"] = (1e-3 * torch.randn(d, r, generator=g)).to(dtype)
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(r, 2.0 * r), indent=2))
        folders.append(folder)
    return folders


def _report_argv(folders: Sequence[Path], out: Path, threads: int | None) -> list[str]:
    argv = [str(f) for f in folders] + ["--out", str(out), "--no-progress"]
    return argv + (["--threads", str(threads)] if threads else [])


def time_report(folders: Sequence[Path], out_root: Path, repeats: int, threads: int | None) -> list[float]:
    """Seconds per call of the report command's main, one warm-up call first (not counted); what the
    command prints is kept out of the benchmark's output."""
    times = []
    for i in range(repeats + 1):
        printed = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            rc = report_main(_report_argv(folders, out_root / f"report{i}", threads))
        times.append(time.perf_counter() - t0)
        if rc != 0:
            raise SystemExit("error: the report command failed")
    return times


def time_process(folders: Sequence[Path], out: Path, threads: int | None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_lab.analysis.subspace_report",
                           *_report_argv(folders, out, threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the report command failed: {proc.stderr.strip()}")
    return time.perf_counter() - t0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_peft_adapters", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (d=512, 2 layers) for a smoke test")
    p.add_argument("--d", type=int, default=None, help="hidden size (default 4096; 512 with --quick)")
    p.add_argument("--layers", type=int, default=None, help="default 32; 2 with --quick")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--r-small", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the stored factors")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the report, after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-process", action="store_true", help="skip the timing of the command as a new process")
    p.add_argument("--keep", default=None, metavar="DIR", help="write adapters and reports here and keep them")
    return p


def measure(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark the command line describes; the results as a dict."""
    args = build_parser().parse_args(argv)
    d = args.d or (512 if args.quick else 4096)
    layers = args.layers or (2 if args.quick else 32)
    if min(d, layers, args.r, args.r_small, args.repeats) < 1 or max(args.r, args.r_small) > d:
        print("error: sizes and repeats must be >= 1 and r <= d", file=sys.stderr)
        raise SystemExit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory(prefix="bench_peft_") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        t0 = time.perf_counter()
        folders = write_adapters(root, d, layers, (args.r_small, args.r), DTYPES[args.dtype])
        t_write = time.perf_counter() - t0
        size = sum((f / WEIGHTS_FILE).stat().st_size for f in folders) / 2 ** 20
        print(f"Two PEFT adapters, {layers} layers x (q_proj, v_proj) of {d}x{d}, r={args.r_small} and r={args.r}, "
              f"{args.dtype}: {size:.0f} MiB written in {t_write:.1f} s")
        times = time_report(folders, root, args.repeats, args.threads)
        warmup, timed = times[0], times[1:]
        median = statistics.median(timed)
        print(f"lora-lab-subspace on both (read + spectra + effective rank + phi + figures + report.md): "
              f"{median:.2f} s median of {args.repeats} ({', '.join(f'{t:.2f}' for t in timed)}; warm-up {warmup:.2f})")
        result = {"d": d, "layers": layers, "r": args.r, "r_small": args.r_small, "dtype": args.dtype,
                  "size_mib": size, "warmup_s": warmup, "times": timed, "median_s": median}
        if not args.no_process:
            result["process_s"] = time_process(folders, root / "report_process", args.threads)
            print(f"  the same as a new process (python -m lora_lab.analysis.subspace_report): "
                  f"{result['process_s']:.2f} s")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: prints the results (exit status 0)."""
    measure(argv)


if __name__ == "__main__":
    main()
