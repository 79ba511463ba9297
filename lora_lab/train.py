"""The training loop: one function, read top to bottom.

    setup (seed, device, tokenizer, data, model, method) -> train with AdamW + linear warm-up/decay
    -> evaluate every epoch on validation and test -> measure -> save the run record.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from lora_lab import measure, records
from lora_lab.data import Collator, load_task_data, make_loader
from lora_lab.errors import ConfigError
from lora_lab.methods import build_method
from lora_lab.metrics import (METRICS, check_monitor, classification_metrics, majority_class_accuracy,
                              regression_metrics)
from lora_lab.modeling import load_model, load_tokenizer
from lora_lab.precision import autocast
from lora_lab.run_info import environment_info
from lora_lab.timing import round_robin, synchronize
from lora_lab.tracking import Tracker


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", name, "CUDA is not available on this machine")
    return torch.device(name)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _progress_disabled(setting) -> bool | None:
    """tqdm's convention: None hides the bar when output is not a terminal (logs, CI)."""
    return None if setting == "auto" else not setting


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, device, precision: str) -> tuple[dict[str, float], list[float]]:
    """Metrics on one split, plus the per-batch forward latency in ms."""
    model.eval()
    predictions, labels, latencies = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, precision):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        synchronize(device)
        latencies.append(1000 * (time.perf_counter() - start))
        if logits.shape[-1] == 1:  # regression: the single output is the prediction
            predictions.extend(logits.float().squeeze(-1).tolist())
        else:
            predictions.extend(logits.argmax(-1).tolist())
        labels.extend(batch["labels"].tolist())
    if logits.shape[-1] == 1:
        return regression_metrics(labels, predictions), latencies
    return classification_metrics(labels, predictions), latencies


def _epoch_row(epoch: int, step: int, train_loss: float, val: dict, test: dict) -> dict:
    row = {"epoch": epoch, "step": step, "train_loss": train_loss}
    row.update({f"validation/{k}": v for k, v in val.items()})
    row.update({f"test/{k}": v for k, v in test.items()})
    return row


def run_training(cfg, run_dir: Path, tracker: Tracker | None = None) -> dict:
    """Train one configuration and write its run record into ``run_dir``. Returns the record."""
    tracker = tracker or Tracker(None)
    run_dir = Path(run_dir)
    tcfg = cfg.trainer
    if tcfg.monitor not in METRICS:
        raise ConfigError("trainer.monitor", tcfg.monitor, f"must be one of {list(METRICS)}")
    method = build_method(cfg.method)  # validates the method's settings before anything is loaded
    device = resolve_device(tcfg.device)
    set_seed(cfg.seed)
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg.threads))

    tokenizer = load_tokenizer(cfg.model)
    data = load_task_data(cfg.data, tokenizer)
    check_monitor(tcfg.monitor, data.regression)
    set_seed(cfg.seed)
    model = load_model(cfg.model, data.num_labels, data.label_names)
    method.apply(model)
    model.to(device)
    counts = measure.parameter_counts(model, method)

    collator = Collator(data.pad_token_id, cfg.data.padding, cfg.data.max_length,
                        torch.float if data.regression else torch.long)
    train_loader = make_loader(data.splits["train"], tcfg.batch_size, collator, shuffle=True, seed=cfg.seed)
    eval_loaders = {s: make_loader(data.splits[s], tcfg.eval_batch_size, collator, shuffle=False, seed=0)
                    for s in ("validation", "test")}
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.get("max_steps"):
        total_steps = min(total_steps, int(tcfg.max_steps))
    optimizer = make_optimizer(model, tcfg.lr, tcfg.weight_decay)
    warmup = int(math.ceil(tcfg.warmup_ratio * total_steps))
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    info = {"parameters": counts, "data_sizes": {k: len(v) for k, v in data.splits.items()},
            "majority_class_test_accuracy": None if data.regression else
            majority_class_accuracy(data.splits["test"]["labels"]),
            "device": str(device)}
    tracker.summary({f"parameters/{k}": v for k, v in counts.items()})
    print(f"[lora_lab] {method.name}: {counts['trainable']:,} trainable of {counts['total']:,} "
          f"({counts['trainable_percent']:.3f} %), {steps_per_epoch} steps/epoch on {device}")

    peak = measure.PeakMemory(device)
    peak.reset()
    throughput = measure.Throughput(tcfg.throughput_warmup_steps, device)
    epochs, step, best, eval_latencies = [], 0, None, []
    train_start = time.perf_counter()
    for epoch in range(1, tcfg.epochs + 1):
        model.train()
        losses = []
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{tcfg.epochs}", leave=False,
                   disable=_progress_disabled(tcfg.progress_bar), dynamic_ncols=True)
        for batch in bar:
            if step >= total_steps:
                break
            batch = to_device(batch, device)
            with throughput.step(batch):
                with autocast(device, tcfg.precision):
                    loss = model(**batch).loss
                loss.backward()
                if tcfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step}")
            losses.append(loss_value)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % tcfg.log_every == 0:
                tracker.log({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0],
                             "train/epoch": epoch}, step=step)
        val, val_latency = evaluate(model, eval_loaders["validation"], device, tcfg.precision)
        test, _ = evaluate(model, eval_loaders["test"], device, tcfg.precision)
        eval_latencies = val_latency
        row = _epoch_row(epoch, step, statistics.fmean(losses) if losses else float("nan"), val, test)
        epochs.append(row)
        tracker.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if best is None or val[tcfg.monitor] > best[f"validation/{tcfg.monitor}"]:
            best = row
        print(f"[lora_lab] epoch {epoch}: loss {row['train_loss']:.4f}  "
              f"val {tcfg.monitor} {val[tcfg.monitor]:.4f}  test {tcfg.monitor} {test[tcfg.monitor]:.4f}")
        if step >= total_steps:
            break
    train_seconds = time.perf_counter() - train_start

    measurements = {**peak.read(), **throughput.summary(), "train_seconds": train_seconds,
                    "eval_batch_ms_median": statistics.median(eval_latencies) if eval_latencies else None}
    measurements.update(_inference_latency(model, method, eval_loaders["validation"], device, tcfg))

    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    records.save_tensors(run_dir / records.STATE_FILE, state, metadata={"method": method.name})
    measurements["trainable_state_bytes"] = (run_dir / records.STATE_FILE).stat().st_size
    if cfg.record.save_delta_w:
        records.save_delta_weights(run_dir / records.DELTA_FILE, method.delta_weights(model))

    record = {
        "status": "completed",
        "method": method.name,
        "method_resolved": method.resolved,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "epochs": epochs,
        "best": best,
        "last": epochs[-1],
        "measurements": measurements,
        **info,
        "environment": environment_info(),
    }
    records.write_json(run_dir / records.RECORD_FILE, record)
    tracker.summary({**{f"best/{k}": v for k, v in best.items()}, **{f"last/{k}": v for k, v in epochs[-1].items()},
                     **{f"measure/{k}": v for k, v in measurements.items()}})
    return record


def _inference_latency(model, method, loader, device, tcfg) -> dict:
    """Forward latency of one training-size batch; for methods that merge, unmerged vs merged,
    interleaved round by round."""
    batch = to_device(next(iter(loader)), device)
    inputs = {k: v[: tcfg.batch_size] for k, v in batch.items() if k != "labels"}
    model.eval()
    enter = ({"unmerged": lambda: method.undo_inference(model), "merged": lambda: method.prepare_inference(model)}
             if method.supports_merge else {"model": lambda: None})
    with torch.no_grad(), autocast(device, tcfg.precision):
        times = round_robin({name: (lambda k: model(**inputs)) for name in enter}, int(tcfg.latency_repeats),
                            warmup=1, device=device, enter=enter)
    method.undo_inference(model)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    if not method.supports_merge:
        return {"inference_ms": ms["model"]}
    return {"inference_ms": ms["merged"], "inference_unmerged_ms": ms["unmerged"], "inference_merged_ms": ms["merged"],
            "merged_over_unmerged": ms["merged"] / ms["unmerged"]}
