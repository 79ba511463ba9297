"""The whole benchmark: build the variants once, run the sections, print and write the results."""
from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_lab.bench.checkpointing import bench_checkpoint
from lora_lab.bench.inference import bench_inference, inference_batch
from lora_lab.bench.memory import memory_breakdown, memory_options
from lora_lab.bench.peft_twin import peft_missing
from lora_lab.bench.report import check_targets, disturbed_samples, render
from lora_lab.bench.sharded_memory import sharded_memory
from lora_lab.bench.training_step import bench_train_step, max_logit_difference
from lora_lab.bench.variants import (
    CONTROL,
    REFERENCE,
    TWIN_PREFIX,
    bench_task,
    build_frozen,
    build_ours,
    build_peft,
    method_config,
    precision_of,
    synthetic_batch,
)
from lora_lab.config.compose import CONFIG_PATH
from lora_lab.errors import ConfigError
from lora_lab.runtime import records


def apply_quick(cfg) -> None:
    """Seconds-long settings for a smoke test of the benchmark itself."""
    with open_dict(cfg):
        cfg.repeats, cfg.warmup, cfg.steps_per_sample = min(int(cfg.repeats), 2), min(int(cfg.warmup), 1), 1
        cfg.inference.repeats, cfg.inference.warmup = min(int(cfg.inference.repeats), 3), 1
        cfg.checkpoint.repeats, cfg.checkpoint.warmup = min(int(cfg.checkpoint.repeats), 2), 1


def run_benchmark(cfg, out=print) -> dict:
    """Measure everything ``cfg`` asks for, print the tables, write the JSON to ``cfg.output``."""
    from lora_lab.models.loading import load_model
    from lora_lab.runtime.run_info import environment_info
    from lora_lab.trainer.setup import resolve_device

    if cfg.quick:
        apply_quick(cfg)
    if not cfg.get("output"):
        raise ConfigError("output", cfg.get("output"), "needs a path for the JSON results")
    precision_of(cfg)
    for arm in [*cfg.arms, *cfg.peft.arms, cfg.inference.arm, *cfg.checkpoint.arms]:
        method_config(str(arm), cfg)  # unknown arms fail before anything is loaded
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

    out(f"[bench] loading {cfg.model.name} ...")
    torch.manual_seed(int(cfg.seed))
    base = load_model(cfg.model, int(cfg.num_labels), None, task=bench_task(cfg))
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions and int(cfg.seq_len) > int(positions):
        raise ConfigError("seq_len", cfg.seq_len, f"exceeds the model's {positions} positions")
    batch = synthetic_batch(base, int(cfg.num_labels), int(cfg.batch_size), int(cfg.seq_len), int(cfg.seed), device)

    variants = {REFERENCE: build_frozen(REFERENCE, base, cfg, device)}
    if cfg.control:
        variants[CONTROL] = build_frozen(CONTROL, base, cfg, device)

    def ours(arm: str):
        if arm not in variants:
            variants[arm] = build_ours(arm, base, cfg, device)
            for _ in range(2):  # a few steps, so that B != 0 and merging or PEFT's copy change something
                variants[arm].step(batch)
        return variants[arm]

    for arm in cfg.arms:
        ours(str(arm))
    peft_note = peft_missing() if cfg.peft.enabled else None
    logit_diffs: dict[str, float] = {}
    if cfg.peft.enabled and peft_note is None:
        for arm in map(str, cfg.peft.arms):
            mine = ours(arm)
            if mine.method.peft_config(mine.model) is None:
                raise ConfigError("peft.arms", arm, f"method {mine.method.name!r} has no PEFT counterpart")
            variants[TWIN_PREFIX + arm] = twin = build_peft(mine, base, cfg, device)
            logit_diffs[arm] = max_logit_difference(mine, twin, batch)

    section("train_step", f"1-2. training step: {len(variants)} variants x ({cfg.warmup} + {cfg.repeats}) rounds ...")
    results["train_step"], results["peft"] = bench_train_step(cfg, variants, batch, device, peft_note, logit_diffs)

    section("memory", "3. memory ...")
    results["memory"] = {name: {"label": v.label, **memory_breakdown(v, batch, device)}
                         for name, v in variants.items() if name != CONTROL}

    if cfg.memory_options.enabled:
        results["memory_options"], results["memory_options_skipped"] = memory_options(cfg, base, batch, device)
    if (cfg.get("sharded_memory") or {}).get("enabled"):
        results["sharded_memory"] = sharded_memory(cfg, base, device)

    if cfg.inference.enabled:
        section("inference", "4. inference latency ...")
        arm = ours(str(cfg.inference.arm))
        if not arm.method.supports_merge:
            raise ConfigError("inference.arm", arm.name, "its method does not merge into the weights")
        ibatch = inference_batch(cfg, base, int(cfg.num_labels), device)
        results["inference"] = bench_inference(cfg, base, arm, ibatch, device)
    if cfg.checkpoint.enabled:
        section("checkpoint", "5. checkpoint writes ...")
        results["checkpoint"] = bench_checkpoint(cfg, {str(a): ours(str(a)) for a in cfg.checkpoint.arms}, batch,
                                                 device)
    variants.clear()
    gc.collect()

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
    records.write_json(path, records.non_finite_to_null(results)[0])  # strict JSON: what was not finite is null
    out(f"[bench] {results['setup']['seconds']:.0f} s; results written to {path}")
    return results


def _hydra_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="bench")
    def app(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        if not cfg.get("output"):
            with open_dict(cfg):
                cfg.output = str(Path(hc.runtime.output_dir) / "bench.json")
        try:
            run_benchmark(cfg)
        except ConfigError as error:
            print(f"lora-lab-bench: error: {error}", file=sys.stderr)
            sys.exit(2)

    return app


def main() -> None:
    from lora_lab.runtime.environment import apply_environment_defaults

    apply_environment_defaults()
    _hydra_app()()


if __name__ == "__main__":
    main()
