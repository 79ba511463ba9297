"""The ``lora-lab-bench`` command: how fast and how large each fine-tuning method is, measured.

    lora-lab-bench                                   # the embedded MiniLM-L6 (about 5 min on 2 CPU cores)
    lora-lab-bench model=tiny quick=true             # under a minute: checks the benchmark, not the numbers
    python -m lora_lab.bench batch_size=8 seq_len=64 methods=[lora_r8,houlsby]

Everything is measured in this one process. Each timed section builds every variant once, keeps it,
and runs the variants round-robin (A/B/C/A/B/C ..., the first of each round rotating), so drift in the
machine's speed hits all of them alike; warm-up rounds are dropped; a figure is the median over the
rounds, shown with its min-max, and a ratio is the quotient of two medians. Every timed sample also
records how much CPU other processes took meanwhile (from /proc/stat); disturbed samples are counted
and flagged in the output, since on a small machine one concurrent job ruins the timings.

1. Training step (forward + backward + AdamW step) per method, relative to the frozen-backbone limit:
   the same model with only the head training and gradients flowing through every frozen layer down
   to the embedding output, which is what any method that adapts every layer must at least pay.
2. Our LoRA against PEFT's LoRA (same model, rank, alpha, target modules, dropout 0), if peft imports.
3. Inference latency: base model, LoRA unmerged, LoRA merged.
4. Memory per method: weights, gradients, optimiser state, saved activations (from the tensors
   themselves on CPU, where the process RSS is too coarse; plus the peak allocation on CUDA).
5. Data path: LoRA training tokens/s on the real data, per-batch padding vs fixed-length padding.
6. Sweep overhead: process start to first step of ``lora-lab``, cold and warm tokenised-data cache.
7. The factored-vs-dense SVD speed-up of ``analysis.bench_subspace``, when that module is present.

Prints Markdown tables, each target with PASS/FAIL, and writes all samples to a JSON file.
"""
from __future__ import annotations

import copy
import gc
import importlib
import inspect
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lora_lab import measure, records
from lora_lab.architectures import head_parameter_names, resolve_targets
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.methods.lora import merge_and_unload

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
REFERENCE = "frozen"
CONTROL = "frozen_copy"
MiB = 1024 * 1024
_LORA_SPEC = re.compile(r"^lora_r(\d+)$")
_PEFT_SPEC = re.compile(r"^peft_lora_r(\d+)$")

# (section, key, label, comparison, threshold): the figures the benchmark is judged by.
TARGETS = (
    ("train_step", "lora_r8", "LoRA r=8 step / frozen-backbone limit", "<=", 1.10),
    ("train_step", "houlsby", "Houlsby adapters step / frozen-backbone limit", "<=", 1.15),
    ("train_step", "pfeiffer", "Pfeiffer adapter step / frozen-backbone limit", "<=", 1.15),
    ("peft", "r8", "ours / PEFT, LoRA r=8 step", "<=", 1.00),
    ("inference", "merged", "LoRA merged / base inference", "<=", 1.02),
    ("data_path", "ratio", "per-batch / fixed-length padding tokens/s", ">=", 1.5),
    ("startup", "warm", "warm-cache start-up to first step (s)", "<=", 5.0),
)


# ---------------------------------------------------------------- timing and statistics

def timed(fn: Callable[[], object], device: torch.device) -> float:
    measure.synchronize(device)
    start = time.perf_counter()
    fn()
    measure.synchronize(device)
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
                per_sample: int = 1, other_load: dict[str, list] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every function, interleaved: ``warmup`` untimed rounds, then ``rounds``
    timed ones; each round calls every function (``per_sample`` times, averaged) with the round index,
    starting one further along the list each round. Garbage is collected between rounds, never during
    one. ``other_load``, if given, receives per name the CPU share other processes took during each sample."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    load = OtherLoad()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for k in range(warmup + rounds):
            shift = k % len(names)
            gc.collect()
            for name in names[shift:] + names[:shift]:
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


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------- the variants

def method_config(spec: str, cfg) -> DictConfig:
    """The method config of a benchmark name: full | head | houlsby | pfeiffer | lora_r<N>."""
    def load(name: str) -> DictConfig:
        return OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")

    lora = _LORA_SPEC.match(spec)
    if spec in ("full", "head"):
        m = load(spec)
        if spec == "head":
            m.top_layers = 0
    elif spec in ("houlsby", "pfeiffer"):
        m = load("adapter")
        m.variant = spec
    elif lora:
        m = load("lora")
        m.r, m.dropout, m.targets = int(lora.group(1)), 0.0, list(cfg.lora_targets)
    else:
        raise ConfigError("methods", spec, "unknown; use full, head, houlsby, pfeiffer or lora_r<N>")
    return m


def label(name: str, lora_targets) -> str:
    lora, peft = _LORA_SPEC.match(name), _PEFT_SPEC.match(name)
    targets = ",".join(str(t) for t in lora_targets)
    if lora:
        return f"LoRA r={lora.group(1)} ({targets})"
    if peft:
        return f"PEFT LoRA r={peft.group(1)} ({targets})"
    return {REFERENCE: "frozen-backbone limit", CONTROL: "frozen-backbone limit, 2nd copy (A/A)",
            "full": "full fine-tuning", "head": "head only", "houlsby": "Houlsby adapters",
            "pfeiffer": "Pfeiffer adapters"}.get(name, name)


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: object | None = None

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self, batch: dict) -> None:
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    from lora_lab.train import make_optimizer

    return make_optimizer(model, float(cfg.lr), 0.01)


def build_ours(spec: str, base: nn.Module, cfg, device: torch.device) -> Variant:
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    method = build_method(method_config(spec, cfg))
    method.apply(model)
    model.to(device).train()
    return Variant(spec, model, _optimizer(model, cfg), method)


def _outputs_require_grad(module, inputs, output):
    return output if output.requires_grad else output.detach().requires_grad_(True)


def build_frozen(name: str, base: nn.Module, cfg, device: torch.device) -> Variant:
    """Head-only training with gradients forced down to the embedding output: the frozen-backbone limit."""
    variant = build_ours("head", base, cfg, device)
    variant.name = name
    variant.model.get_input_embeddings().register_forward_hook(_outputs_require_grad)
    return variant


def peft_missing() -> str | None:
    """None when peft imports, else the note that explains the skipped row."""
    try:
        import peft  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: no comparison
        return f"peft is not importable ({type(error).__name__}: {error}); `pip install peft` to compare"
    return None


def build_peft(r: int, base: nn.Module, cfg, device: torch.device) -> Variant:
    """PEFT's LoRA with our LoRA's settings: the same target modules (by full name), rank, alpha,
    dropout 0, and the same head parameters training."""
    import peft

    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base)
    ours = method_config(f"lora_r{r}", cfg)
    targets = sorted({n for names in resolve_targets(model, ours.targets).values() for n in names})
    head = head_parameter_names(model)
    config = peft.LoraConfig(r=r, lora_alpha=float(ours.alpha), lora_dropout=0.0, target_modules=targets,
                             bias="none", use_rslora=bool(ours.rslora))
    wrapped = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():  # ``model`` is the wrapped one's inner model, names unchanged
        if name in head:
            p.requires_grad_(True)
    wrapped.to(device).train()
    return Variant(f"peft_lora_r{r}", wrapped, _optimizer(wrapped, cfg))


def synthetic_batch(model: nn.Module, num_labels: int, batch_size: int, seq_len: int, seed: int,
                    device: torch.device) -> dict:
    """Random token ids (clear of the low ids where vocabularies keep special tokens), no padding."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- 1 + 2: training step

def bench_train_step(cfg, variants: dict[str, Variant], batch: dict, device: torch.device,
                     peft_note: str | None) -> tuple[dict, dict]:
    fns = {name: (lambda k, v=v: v.step(batch)) for name, v in variants.items()}
    other: dict[str, list] = {}
    times = round_robin(fns, int(cfg.repeats), int(cfg.warmup), device, int(cfg.steps_per_sample), other)
    ref = summarise(times[REFERENCE], 1000)
    rows = {}
    for name, v in variants.items():
        s = summarise(times[name], 1000)
        c = compare(s, ref)
        rows[name] = {"label": label(name, cfg.lora_targets), "trainable_params": v.trainable, "step_ms": s,
                      "ratio_to_frozen": s["median"] / ref["median"],
                      "paired_ratio_min": c["paired_min"], "paired_ratio_max": c["paired_max"]}
    train = {"unit": "ms", "reference": REFERENCE, "batch_size": int(cfg.batch_size), "seq_len": int(cfg.seq_len),
             "repeats": int(cfg.repeats), "warmup": int(cfg.warmup), "steps_per_sample": int(cfg.steps_per_sample),
             "other_processes_cpu_share": load_summary(other), "rows": rows}
    peft_rows: dict = {}
    if peft_note:
        peft_rows["skipped"] = peft_note
    for name in variants:
        m = _PEFT_SPEC.match(name)
        if m:
            ours, theirs = rows[f"lora_r{m.group(1)}"]["step_ms"], rows[name]["step_ms"]
            c = compare(ours, theirs)
            peft_rows[f"r{m.group(1)}"] = {
                "ours_ms": ours, "peft_ms": theirs, "ratio": ours["median"] / theirs["median"],
                "paired_ratio_min": c["paired_min"], "paired_ratio_max": c["paired_max"],
                "trainable_ours": variants[f"lora_r{m.group(1)}"].trainable,
                "trainable_peft": variants[name].trainable}
    if peft_rows:
        import importlib.metadata as md

        try:
            peft_rows["peft_version"] = md.version("peft")
        except md.PackageNotFoundError:
            pass
    return train, peft_rows


# ---------------------------------------------------------------- 3: inference latency

def bench_inference(cfg, base: nn.Module, lora: Variant, batch: dict, device: torch.device) -> dict:
    icfg = cfg.inference
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base_model = copy.deepcopy(base).to(device).eval()
    unmerged = copy.deepcopy(lora.model).eval()
    merged = copy.deepcopy(lora.model).eval()
    lora.method.prepare_inference(merged)
    unloaded = merge_and_unload(copy.deepcopy(lora.model)).eval()
    models = {"base": base_model, "lora_unmerged": unmerged, "lora_merged": merged, "lora_merged_unloaded": unloaded}
    with torch.inference_mode():
        diff = float((merged(**inputs).logits - unmerged(**inputs).logits).abs().max())
        other: dict[str, list] = {}
        times = round_robin({name: (lambda k, m=m: m(**inputs)) for name, m in models.items()},
                            int(icfg.repeats), int(icfg.warmup), device, other_load=other)
    out = {"unit": "ms", "r": int(icfg.r), "batch_size": int(inputs["input_ids"].shape[0]),
           "seq_len": int(inputs["input_ids"].shape[1]), "repeats": int(icfg.repeats),
           "merged_vs_unmerged_max_abs_logit_diff": diff, "other_processes_cpu_share": load_summary(other),
           "rows": {}}
    ref = summarise(times["base"], 1000)
    for name in models:
        s = summarise(times[name], 1000)
        c = compare(s, ref)
        out["rows"][name] = {"latency_ms": s, "ratio_to_base": s["median"] / ref["median"],
                             "paired_ratio_min": c["paired_min"], "paired_ratio_max": c["paired_max"]}
    out["merged"] = out["rows"]["lora_merged"]["ratio_to_base"]
    out["unmerged"] = out["rows"]["lora_unmerged"]["ratio_to_base"]
    return out


def inference_batch(cfg, model: nn.Module, num_labels: int, device: torch.device) -> dict:
    return synthetic_batch(model, num_labels, int(cfg.inference.batch_size), int(cfg.inference.seq_len),
                           int(cfg.seed) + 1, device)


# ---------------------------------------------------------------- 4: memory

class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters and buffers excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages = exclude, {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key, size = id(t), nbytes(t)
        if key not in self.exclude:
            self.storages[key] = max(size, self.storages.get(key, 0))
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def memory_breakdown(v: Variant, batch: dict, device: torch.device) -> dict:
    """One more training step of a variant, taken apart: weights (every parameter), gradients (what
    backward leaves in .grad), AdamW state (read from the optimiser after the step), activations
    (the tensors one forward saves for backward) and, on CUDA, the peak allocation of the step."""
    model = v.model
    params = list(model.parameters())
    buffers = list(model.buffers())
    exclude = {t.untyped_storage().data_ptr() for t in params + buffers}
    v.optimizer.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    saved = SavedTensorBytes(exclude)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = model(**batch).loss
    loss.backward()
    grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
    v.optimizer.step()
    optim = sum(nbytes(t) for state in v.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    out = {
        "weights_mb": sum(nbytes(p) for p in params) / MiB,
        "buffers_mb": sum(nbytes(b) for b in buffers) / MiB,
        "gradients_mb": grads / MiB,
        "trainable_params_mb": sum(nbytes(p) for p in params if p.requires_grad) / MiB,
        "optimizer_state_mb": optim / MiB,
        "activations_saved_mb": saved.total / MiB,
    }
    out["total_mb"] = (out["weights_mb"] + out["buffers_mb"] + out["gradients_mb"] + out["optimizer_state_mb"]
                       + out["activations_saved_mb"])
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out["cuda_peak_allocated_mb"] = peak / MiB
        out["cuda_activations_mb"] = (peak - before - grads) / MiB  # peak minus weights, state and grads
    v.optimizer.zero_grad(set_to_none=True)
    out["kind"] = "analytic from tensors" + (" + cuda peak allocated" if cuda else "")
    return out


# ---------------------------------------------------------------- 5: data path

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


# ---------------------------------------------------------------- 6: start-up overhead

# The same start in a bare process: import torch and transformers, load the tokenizer and the model,
# take one step; no Hydra, no data, no lora_lab training code. What any start-up pays at least.
_FLOOR_SCRIPT = r"""
import json, sys
from lora_lab.measure import process_age_seconds as age
import torch
ages = {"import_torch": age()}
from omegaconf import OmegaConf
from lora_lab.modeling import load_model, load_tokenizer
cfg = OmegaConf.create(json.loads(sys.argv[1]))
load_tokenizer(cfg)
ages["tokenizer_loaded"] = age()
model = load_model(cfg, 2).train()
ages["model_loaded"] = age()
vocab = model.get_input_embeddings().num_embeddings
ids = torch.randint(min(1000, vocab // 2), vocab, (16, 48), generator=torch.Generator().manual_seed(0))
head = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
optimizer = torch.optim.AdamW(head, lr=1e-4)
model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(16, dtype=torch.long)).loss.backward()
optimizer.step()
ages["first_step"] = age()
print(json.dumps(ages))
"""


def startup_command() -> list[str]:
    exe = shutil.which("lora-lab")
    return [exe] if exe else [sys.executable, "-m", "lora_lab.main"]


def bench_startup(cfg, forwarded: list[str]) -> dict:
    """``lora-lab`` run twice as a fresh process on a fresh data cache: the first run tokenises
    (cold), the second finds the tokenised data on disk (warm). Each run reports the seconds from its
    process start to the end of its first training step."""
    scfg = cfg.startup
    tmp = Path(tempfile.mkdtemp(prefix="lora_lab_bench_"))
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    out: dict = {"command": None, "runs": {}}
    try:
        for name in ("cold", "warm"):
            args = [*startup_command(), *forwarded, "method=lora", f"data.max_train={int(scfg.max_train)}",
                    f"data.max_eval={int(scfg.max_eval)}", "trainer.max_steps=1", "trainer.epochs=1",
                    "trainer.progress_bar=false", "trainer.latency_repeats=1", "logger=disabled",
                    f"data.cache_dir={tmp / 'cache'}",
                    f"hydra.run.dir={tmp / name}"]
            out["command"] = " ".join(a if a != args[0] else Path(a).name for a in args)
            start = time.perf_counter()
            proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=float(scfg.timeout_s))
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                out["error"] = f"{name} run exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                return out
            record = records.load_record(tmp / name)
            out["runs"][name] = {"process_start_to_first_step_s":
                                 record["measurements"]["process_start_to_first_step_s"], "wall_s": wall}
            if name == "cold":
                out["cache_entries_after_cold"] = len(list((tmp / "cache" / "tokenized").glob("*")))
        if scfg.floor:
            model = json.dumps(OmegaConf.to_container(cfg.model, resolve=True))
            proc = subprocess.run([sys.executable, "-c", _FLOOR_SCRIPT, model], capture_output=True, text=True,
                                  env=env, timeout=float(scfg.timeout_s))
            if proc.returncode == 0:
                out["floor"] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                out["floor_error"] = proc.stderr.strip()[-2000:]
    except subprocess.TimeoutExpired as error:
        out["error"] = f"timed out after {error.timeout} s"
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["cold"] = out["runs"]["cold"]["process_start_to_first_step_s"]
    out["warm"] = out["runs"]["warm"]["process_start_to_first_step_s"]
    out["warm_over_cold"] = out["warm"] / out["cold"]
    return out


def forwarded_overrides(task_overrides: list[str], cfg) -> list[str]:
    """The command-line overrides of this benchmark that choose the model and data, for ``lora-lab``."""
    own = {"data.cache_dir", "data.max_train", "data.max_eval"}
    out = []
    for item in task_overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in ("model", "data"):
            out = [o for o in out if o.split("=", 1)[0].lstrip("+~") != key]
        if (key in ("model", "data") or key.startswith(("model.", "data."))) and key not in own:
            out.append(item)
    if cfg.get("threads"):
        out.append(f"trainer.threads={int(cfg.threads)}")
    out.append(f"trainer.device={cfg.device}")
    return out


# ---------------------------------------------------------------- 7: subspace analysis

def bench_subspace(cfg) -> dict:
    scfg = cfg.subspace
    try:
        module = importlib.import_module("analysis.bench_subspace")
    except Exception as error:  # noqa: BLE001
        return {"skipped": f"analysis.bench_subspace is not importable ({type(error).__name__}: {error})"}
    fn = getattr(module, "run_benchmark", None)
    if not callable(fn):
        return {"skipped": "analysis.bench_subspace has no run_benchmark()"}
    lines: list[str] = []
    wanted = {"d": int(scfg.d), "r": int(scfg.r), "r_small": int(scfg.r_small), "layers": int(scfg.layers),
              "repeats": int(scfg.repeats), "dense_repeats": int(scfg.dense_repeats),
              "factored_repeats": int(scfg.factored_repeats), "w_row": False, "out": lines.append}
    params = inspect.signature(fn).parameters
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in wanted
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        return {"skipped": f"analysis.bench_subspace.run_benchmark needs {missing}, which this benchmark does not set"}
    try:
        result = fn(**{k: v for k, v in wanted.items() if k in params})
    except Exception as error:  # noqa: BLE001 - that module's failure must not lose the other sections
        return {"skipped": f"analysis.bench_subspace.run_benchmark failed: {type(error).__name__}: {error}"}
    keep = ("d", "r", "factored_s", "dense_s", "ratio", "agreement")
    out = {k: result[k] for k in keep if isinstance(result, dict) and k in result}
    out["printed"] = lines
    if "ratio" not in out:
        out["skipped"] = "run_benchmark() returned no 'ratio'"
    return out


# ---------------------------------------------------------------- targets and tables

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
             f"torch {env['torch']}",
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
        rows = [["cold (empty data cache)", f"{st['cold']:.2f}", f"{st['runs']['cold']['wall_s']:.1f}", "", ""],
                ["warm (tokenised data cached)", f"{st['warm']:.2f}", f"{st['runs']['warm']['wall_s']:.1f}",
                 target, verdict]]
        floor = st.get("floor")
        if floor:
            rows.append(["bare process (torch + transformers, tokenizer, model, 1 step)",
                         f"{floor['first_step']:.2f}", "", "", ""])
        parts += [f"### 6. Sweep overhead: process start to first training step of `{st['command']}`",
                  markdown_table(["run", "start to first step s", "whole run wall s", "target", "result"], rows)]
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


# ---------------------------------------------------------------- the whole benchmark

def apply_quick(cfg) -> None:
    """Seconds-long settings for a smoke test of the benchmark itself."""
    with open_dict(cfg):
        cfg.repeats, cfg.warmup, cfg.steps_per_sample = min(int(cfg.repeats), 2), min(int(cfg.warmup), 1), 1
        cfg.inference.repeats, cfg.inference.warmup = min(int(cfg.inference.repeats), 3), 1
        cfg.data_path.steps, cfg.data_path.warmup = min(int(cfg.data_path.steps), 2), 1
        cfg.startup.max_train, cfg.startup.max_eval = min(int(cfg.startup.max_train), 32), 16
        cfg.startup.floor = False
        cfg.subspace.d, cfg.subspace.r, cfg.subspace.r_small = 128, 16, 4
        cfg.subspace.layers, cfg.subspace.repeats, cfg.subspace.dense_repeats = 1, 1, 1
        cfg.subspace.factored_repeats = 2
        if cfg.data.max_train is None or int(cfg.data.max_train) > 256:
            cfg.data.max_train = 256
        if cfg.data.max_eval is None or int(cfg.data.max_eval) > 64:
            cfg.data.max_eval = 64


def run_benchmark(cfg, forwarded: list[str] | None = None, out=print) -> dict:
    """Measure everything ``cfg`` asks for, print the tables, write the JSON to ``cfg.output``."""
    from lora_lab.data import load_task_data
    from lora_lab.modeling import load_model, load_tokenizer
    from lora_lab.run_info import environment_info
    from lora_lab.train import resolve_device

    if cfg.quick:
        apply_quick(cfg)
    if not cfg.get("output"):
        raise ConfigError("output", cfg.get("output"), "needs a path for the JSON results")
    for spec in cfg.methods:
        method_config(str(spec), cfg)  # unknown names fail before anything is loaded
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results: dict = {"config": OmegaConf.to_container(cfg, resolve=True)}
    seconds = results["section_seconds"] = {}
    current = ["setup", time.perf_counter()]

    def section(name: str, message: str) -> None:
        """Stop the clock of the running section, start the next one's and announce it."""
        now = time.perf_counter()
        seconds[current[0]] = now - current[1]
        current[:] = [name, now]
        out(f"[bench] {message}")

    out(f"[bench] loading {cfg.model.name} and {cfg.data.name} ...")
    tokenizer = load_tokenizer(cfg.model)
    data = load_task_data(cfg.data, tokenizer) if cfg.data_path.enabled else None
    num_labels = data.num_labels if data else 2
    torch.manual_seed(int(cfg.seed))
    base = load_model(cfg.model, num_labels, data.label_names if data else None)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions and int(cfg.seq_len) > int(positions):
        raise ConfigError("seq_len", cfg.seq_len, f"exceeds the model's {positions} positions")
    batch = synthetic_batch(base, num_labels, int(cfg.batch_size), int(cfg.seq_len), int(cfg.seed), device)

    variants = {REFERENCE: build_frozen(REFERENCE, base, cfg, device)}
    if cfg.control:
        variants[CONTROL] = build_frozen(CONTROL, base, cfg, device)
    for spec in cfg.methods:
        variants[str(spec)] = build_ours(str(spec), base, cfg, device)
    peft_note = peft_missing() if cfg.peft.enabled else None
    if cfg.peft.enabled and peft_note is None:
        for r in cfg.peft.ranks:
            if f"lora_r{int(r)}" not in variants:
                variants[f"lora_r{int(r)}"] = build_ours(f"lora_r{int(r)}", base, cfg, device)
            variants[f"peft_lora_r{int(r)}"] = build_peft(int(r), base, cfg, device)

    section("train_step", f"1-2. training step: {len(variants)} variants x ({cfg.warmup} + {cfg.repeats}) rounds ...")
    results["train_step"], results["peft"] = bench_train_step(cfg, variants, batch, device, peft_note)

    section("memory", "4. memory ...")
    results["memory"] = {name: memory_breakdown(v, batch, device) for name, v in variants.items()
                         if name != CONTROL}

    def lora_variant(r: int) -> Variant:
        name = f"lora_r{r}"
        if name not in variants:
            variants[name] = build_ours(name, base, cfg, device)
            for _ in range(2):  # a few steps so that B != 0 and merging changes the weights
                variants[name].step(batch)
        return variants[name]

    if cfg.inference.enabled:
        section("inference", "3. inference latency ...")
        ibatch = inference_batch(cfg, base, num_labels, device)
        results["inference"] = bench_inference(cfg, base, lora_variant(int(cfg.inference.r)), ibatch, device)
    if cfg.data_path.enabled:
        section("data_path", "5. data path ...")
        results["data_path"] = bench_data_path(cfg, data, lora_variant(int(cfg.data_path.r)), device)
    del variants
    gc.collect()
    if cfg.startup.enabled:
        section("startup", "6. start-up overhead (two lora-lab processes) ...")
        results["startup"] = bench_startup(cfg, forwarded if forwarded is not None else [])
    if cfg.subspace.enabled:
        section("subspace", "7. subspace analysis ...")
        results["subspace"] = bench_subspace(cfg)

    section("report", "done")
    results["setup"] = {"model": str(cfg.model.name), "device": str(device), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "loadavg_before": list(load_before),
                        "loadavg_after": list(os.getloadavg()), "cpu_count": os.cpu_count(),
                        "seconds": time.perf_counter() - started}
    results["setup"]["disturbed_samples"] = disturbed_samples(results)
    results["environment"] = environment_info()
    results["targets"] = check_targets(results)
    table = render(results)
    results["table_markdown"] = table
    out(table)
    path = Path(cfg.output)
    records.write_json(path, results)
    out(f"[bench] {results['setup']['seconds']:.0f} s; results written to {path}")
    return results


def _hydra_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="bench")
    def app(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        if not cfg.get("output"):
            with open_dict(cfg):
                cfg.output = str(Path(hc.runtime.output_dir) / "bench.json")
        choices = [f"model={hc.runtime.choices['model']}", f"data={hc.runtime.choices['data']}"]
        try:
            run_benchmark(cfg, forwarded_overrides(choices + list(hc.overrides.task), cfg))
        except ConfigError as error:
            print(f"lora-lab-bench: error: {error}", file=sys.stderr)
            sys.exit(2)

    return app


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    _hydra_app()()


if __name__ == "__main__":
    main()
