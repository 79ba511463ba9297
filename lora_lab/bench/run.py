"""The whole benchmark: build the variants once, run the sections, print and write the results."""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lab import records
from lora_lab.errors import ConfigError
from lora_lab.bench.variants import (
    CONFIG_DIR, CONTROL, REFERENCE, Variant, build_frozen, build_ours, build_peft, method_config, peft_missing,
    precision_of, synthetic_batch)
from lora_lab.bench.training_step import bench_train_step
from lora_lab.bench.inference import bench_inference, inference_batch
from lora_lab.bench.memory import memory_breakdown
from lora_lab.bench.data_path import bench_data_path
from lora_lab.bench.startup import bench_startup, forwarded_overrides
from lora_lab.bench.subspace import bench_subspace
from lora_lab.bench.report import check_targets, disturbed_samples, render


def apply_quick(cfg) -> None:
    """Seconds-long settings for a smoke test of the benchmark itself."""
    with open_dict(cfg):
        cfg.repeats, cfg.warmup, cfg.steps_per_sample = min(int(cfg.repeats), 2), min(int(cfg.warmup), 1), 1
        cfg.inference.repeats, cfg.inference.warmup = min(int(cfg.inference.repeats), 3), 1
        cfg.data_path.steps, cfg.data_path.warmup = min(int(cfg.data_path.steps), 2), 1
        cfg.startup.max_train, cfg.startup.max_eval = min(int(cfg.startup.max_train), 32), 16
        cfg.startup.floor, cfg.startup.repeats = False, 1
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
    precision_of(cfg)
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
    variants.clear()
    gc.collect()
    if cfg.startup.enabled:
        section("startup", f"6. start-up overhead ({cfg.startup.repeats} x lora-lab cold, warm"
                f"{', warm server' if cfg.startup.server else ''}) ...")
        results["startup"] = bench_startup(cfg, forwarded if forwarded is not None else [])
    if cfg.subspace.enabled:
        section("subspace", "7. subspace analysis ...")
        results["subspace"] = bench_subspace(cfg)

    section("report", "done")
    results["setup"] = {"model": str(cfg.model.name), "device": str(device), "precision": precision_of(cfg),
                        "threads": torch.get_num_threads(),
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
