"""The training loop: one function, read top to bottom.

    setup (seed, device, tokenizer, data, model, method) -> [resume from a checkpoint] -> train with
    AdamW + linear warm-up/decay, checkpointing every N steps -> evaluate every epoch on validation and
    test, keep the best epoch's state -> save it, its ΔW and the run record, with the measurements.

The best epoch is the one with the best validation main metric in that metric's direction (lower
perplexity is better: lora_lab.tasks.metrics.higher_is_better). A causal LM (task head "lm") is scored by
its token-weighted loss and perplexity; its baseline is the pre-trained model itself, evaluated on
test before the method is applied (once: a resumed run reads it from its checkpoint), and with
``trainer.generation.enabled`` its greedy generations add BLEU and ROUGE-L (lora_lab.tasks.generation_eval).
"""
from __future__ import annotations

import math
import random
import shutil
import signal
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from lora_lab.data import lm_data

from lora_lab.models import quantization

from lora_lab.runtime import checkpoint, measure, records

from lora_lab.tasks import generation_eval
from lora_lab.data.loading import Collator, column_values, load_task_data
from lora_lab.runtime.distributed import Distributed, device_for, setup as setup_distributed
from lora_lab.models.architectures import model_type
from lora_lab.errors import ConfigError
from lora_lab.tasks.losses import sequence_nll, training_loss
from lora_lab.tasks.metrics import is_better
from lora_lab.methods import build_method
from lora_lab.models.loading import cast_trainable_to_fp32, enable_gradient_checkpointing, is_causal_decoder, load_model, \
    load_tokenizer, pooling_of, weights_dtype
from lora_lab.models.precision import autocast
from lora_lab.runtime.preemption import Preempted, StopRequests
from lora_lab.config.run_identity import result_config
from lora_lab.runtime.run_info import environment_info
from lora_lab.data.sampling import evaluation_loader, training_loader
from lora_lab.tasks.task_types import TaskType, describe, main_metric, objective
from lora_lab.runtime.timing import round_robin, synchronize
from lora_lab.data.token_data import IGNORED
from lora_lab.runtime.tracking import Tracker
from lora_lab.config.validate import check_config, check_data


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


def own_batches(loader, dist: Distributed):
    """The evaluation batches this rank predicts: every ``world_size``-th, from its rank on."""
    if not dist.enabled:
        return loader
    batches = [b for i, b in enumerate(loader.batch_sampler) if i % dist.world_size == dist.rank]
    return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn)


@torch.no_grad()
def predict(model, loader, device, amp, task: TaskType,
            dist: Distributed = Distributed()) -> tuple[list, list[float]]:
    """Predictions on one split in order, plus the per-batch forward latency in ms. Tagging: per
    sentence, the predicted tag of each word (at its first sub-token). Causal LM: per example, the
    summed negative log-likelihood of its predicted tokens (``sequence_nll``). Over several ranks each
    predicts its share of the batches (the same batches as one process) and all get every prediction."""
    model.eval()
    per_batch, latencies = [], []
    for batch in own_batches(loader, dist):
        batch = to_device(batch, device)
        synchronize(device)
        start = time.perf_counter()
        with amp():  # the run's autocast context (lora_lab.models.precision)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        synchronize(device)
        latencies.append(1000 * (time.perf_counter() - start))
        if task.head == "lm":
            per_batch.append(sequence_nll(logits, batch["labels"]))
        elif task.head == "token":
            tags, labels = logits.argmax(-1).cpu(), batch["labels"].cpu()
            per_batch.append([row[gold != IGNORED].tolist() for row, gold in zip(tags, labels)])
        elif task.name == "regression":  # the single output is the prediction
            per_batch.append(logits.float().squeeze(-1).tolist())
        else:
            per_batch.append(logits.argmax(-1).tolist())
    if dist.enabled:  # rank r predicted batches r, r + world_size, ...: interleave them back
        shares = dist.gather(per_batch)
        per_batch = [shares[i % dist.world_size][i // dist.world_size] for i in range(sum(map(len, shares)))]
    return [p for batch_predictions in per_batch for p in batch_predictions], latencies


def gold_labels(dataset, task: TaskType) -> list:
    """What predictions are scored against: a label per example, every word's tag per sentence, or
    (causal LM) the number of tokens each example predicts, which weighs its summed loss."""
    if task.head == "lm":
        return [lm_data.predicted_tokens(labels) for labels in column_values(dataset, "labels")]
    return column_values(dataset, "word_labels" if task.head == "token" else "labels")


def evaluate(model, loader, gold: list, device, amp, task: TaskType, label_names: list[str],
             dist: Distributed = Distributed()) -> tuple[dict[str, float], dict, list[float]]:
    """The task's metrics on one split, its per-class report (tagging: per entity type) and the
    per-batch forward latency in ms (of this rank's batches)."""
    predictions, latencies = predict(model, loader, device, amp, task, dist)
    metrics, report = task.score(gold, predictions, label_names)
    return metrics, report, latencies


def baseline(task: TaskType, gold: list, label_names: list[str]) -> dict:
    """The run record's ``baseline``: what predicting the majority class (a constant, O everywhere)
    scores on the test split. (A causal LM's is the pre-trained model: ``pretrained_baseline``.)"""
    metrics, _ = task.score(gold, task.baseline_predictions(gold, label_names), label_names)
    return {"name": task.baseline, "test": metrics}


def pretrained_baseline(model, loader, gold: list, device, amp, task: TaskType, dist: Distributed,
                        generation: "generation_eval.SplitGeneration | None" = None) -> dict:
    """The causal LM's ``baseline``: the test metrics of the model as loaded, before any method
    changes it (and its generations, with ``trainer.generation`` on test). The model goes back to
    the CPU afterwards and the random state is restored, so the method is set up exactly as in a run
    without this evaluation."""
    rng = torch.get_rng_state()
    quantization.to_device(model, device)
    metrics, _, _ = evaluate(model, loader, gold, device, amp, task, [], dist=dist)
    out = {"name": task.baseline, "test": metrics}
    if generation is not None:
        scores, examples = generation.run(model, device, amp, dist)
        metrics.update(scores)
        out["generations"] = {"test": examples}
    quantization.to_device(model, "cpu")
    torch.set_rng_state(rng)
    return out


def generation_splits(cfg, data, tokenizer, monitor: str) -> dict[str, "generation_eval.SplitGeneration"]:
    """The splits generated on after every epoch (``trainer.generation``), each with its prompts: the
    configured ones, and validation whenever a generation metric picks the best epoch. None when off."""
    settings = cfg.trainer.get("generation") or {}
    if not settings.get("enabled"):
        return {}
    generation_eval.require_libraries()
    splits = set(settings.get("splits") or [])
    if monitor in data.task.optional_metrics:
        splits.add("validation")
    return {split: generation_eval.SplitGeneration(
                data.splits[split], tokenizer, settings, end_of_text=lm_data.end_of_text_id(tokenizer),
                pad_token_id=data.pad_token_id, batch_size=cfg.trainer.eval_batch_size)
            for split in ("validation", "test") if split in splits}


def _epoch_row(epoch: int, step: int, train_loss: float, val: dict, test: dict) -> dict:
    row = {"epoch": epoch, "step": step, "train_loss": train_loss}
    row.update({f"validation/{k}": v for k, v in val.items()})
    row.update({f"test/{k}": v for k, v in test.items()})
    return row


class Diverged(FloatingPointError):
    """The training loss is NaN or infinite: the run stops before the optimiser applies that step."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"training loss is {loss} at step {step}; stopped before the update")


def fresh_progress() -> dict:
    """Where a run stands; saved in every checkpoint, so a resumed run goes on from here."""
    return {"step": 0, "epoch": 1, "batch": 0, "epochs": [], "best": None, "best_epoch": None,
            "stale_epochs": 0, "stopped_early": False, "training_done": False, "train_seconds": 0.0,
            "checkpoint_seconds": 0.0, "checkpoints_written": 0, "peaks": {"train": None, "eval": None},
            "throughput": None, "eval_batch_ms_median": None, "resumes": [], "wandb_run_id": None,
            "reports": {}, "baseline": None, "generations": {}}


def _clone_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in checkpoint.trainable_state(model).items()}


def run_training(cfg, run_dir: Path, tracker: Tracker | None = None, stop: StopRequests | None = None,
                 dist: Distributed | None = None) -> dict:
    """Train one configuration and write its run record into ``run_dir``. Returns the record.

    With ``trainer.checkpoint_every`` > 0 a checkpoint is written every that many steps and at the end
    of every epoch, and a checkpoint found in ``run_dir`` is resumed from (``trainer.resume``).
    Under ``torchrun`` every rank runs this; rank 0 alone writes files and logs (lora_lab.runtime.distributed)."""
    tracker = tracker or Tracker(None)
    stop = stop or StopRequests()
    run_dir = Path(run_dir)
    tcfg = cfg.trainer
    check_config(cfg)
    dist = dist or setup_distributed(tcfg.device)
    main_rank = dist.is_main
    say = print if main_rank else (lambda *args, **kwargs: None)
    monitor = main_metric(cfg.data)
    method = build_method(cfg.method)  # validates the method's settings before anything is loaded
    device = resolve_device(device_for(dist, tcfg.device))
    set_seed(cfg.seed)
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg.threads))

    tokenizer = load_tokenizer(cfg.model)
    data = load_task_data(cfg.data, tokenizer)
    check_data(cfg, data)
    task = data.task
    # bf16 weights need bf16 matmuls on every device; an fp32 base autocasts on GPUs only (trainer.precision)
    bf16_weights = weights_dtype(cfg.model) == torch.bfloat16
    precision = "bf16" if bf16_weights else tcfg.precision
    amp = lambda: autocast(device, precision, on_cpu=bf16_weights)  # noqa: E731
    collator = Collator(data.pad_token_id, cfg.data.padding, cfg.data.max_length,
                        torch.float if data.regression else torch.long)
    eval_loaders = {s: evaluation_loader(data.splits[s], tcfg.eval_batch_size, collator)
                    for s in ("validation", "test")}
    gold = {s: gold_labels(data.splits[s], task) for s in eval_loaders}
    generators = generation_splits(cfg, data, tokenizer, monitor)
    checkpoint_dir = run_dir / checkpoint.CHECKPOINT_DIR
    set_seed(cfg.seed)
    model = load_model(cfg.model, data.num_labels, data.label_names, task=task.head,
                       pad_token_id=tokenizer.pad_token_id)
    pretrained = None
    if task.head == "lm":  # the pre-trained model is the baseline: evaluated once, before the method
        known = checkpoint.peek_progress(checkpoint_dir) if tcfg.get("resume", True) and main_rank else None
        pretrained = dist.broadcast((known or {}).get("baseline"))
        if pretrained is None:
            pretrained = pretrained_baseline(model, eval_loaders["test"], gold["test"], device, amp, task, dist,
                                             generators.get("test"))
    if is_causal_decoder(model_type(model)):  # GPT-2 would add token-type embeddings an encoder's tokenizer asks for
        collator.token_types = False
    method.apply(model)
    cast_trainable_to_fp32(model)  # a bf16 base (model.dtype) trains fp32 parameters
    if tcfg.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    quantization.to_device(model, device)
    counts = measure.parameter_counts(model, method)
    train_model = wrap_distributed(model, method, dist, device)
    if dist.enabled:  # the same initial weights on every rank, then dropout masks of each rank's own
        torch.manual_seed(cfg.seed * 1_000 + dist.rank)

    train_loader = training_loader(data.splits["train"], tcfg.batch_size, collator, seed=cfg.seed,
                                   rank=dist.rank, world_size=dist.world_size)
    batches = train_loader.batch_sampler
    accum = int(tcfg.get("grad_accum") or 1)
    batches_per_epoch = batches.batches_per_epoch()  # micro-batches; an optimiser step takes ``accum`` of them
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.get("max_steps"):
        total_steps = min(total_steps, int(tcfg.max_steps))
    optimizer = make_optimizer(model, tcfg.lr, tcfg.weight_decay)
    warmup = (int(tcfg.warmup_steps) if tcfg.get("warmup_steps") is not None
              else int(math.ceil(tcfg.warmup_ratio * total_steps)))
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    config = result_config(OmegaConf.to_container(cfg, resolve=True))
    every = int(tcfg.get("checkpoint_every") or 0)
    if main_rank:
        checkpoint.discard_partial_writes(run_dir, checkpoint_dir)
    progress, losses, best_state = fresh_progress(), [], None
    throughput = measure.Throughput(tcfg.throughput_warmup_steps, device)
    saved = checkpoint.load(checkpoint_dir) if tcfg.get("resume", True) else None
    if saved is not None:
        checkpoint.check_config(saved, config)
        checkpoint.restore(saved, model, optimizer, scheduler)
        progress = {"reports": {}, **saved.progress}
        losses = saved.tensors["progress/epoch_losses"].tolist()
        if progress["throughput"]:
            own = (progress.get("throughput_ranks") or [progress["throughput"]])[dist.rank]
            throughput.restore(own, saved.tensors["progress/step_seconds"].tolist())
        if progress["best_epoch"] is not None:
            best_state = {k: v.to(device) for k, v in checkpoint.load_best(checkpoint_dir,
                                                                            progress["best_epoch"]).items()}
        progress["resumes"].append({"step": progress["step"], "epoch": progress["epoch"]})
        say(f"[lora_lab] resuming from {saved.path}: step {progress['step']} of {total_steps} "
            f"(epoch {progress['epoch']}, batch {progress['batch']})")
    elif checkpoint_dir.exists() and main_rank:
        shutil.rmtree(checkpoint_dir)  # trainer.resume=false: start over
    dist.barrier()  # nobody goes on while rank 0 may still be clearing the run directory
    progress["wandb_run_id"] = progress["wandb_run_id"] or getattr(tracker, "run_id", None)
    progress["generations"] = progress.get("generations") or {}
    if task.head == "lm":
        progress["baseline"] = progress.get("baseline") or pretrained
    else:
        progress["baseline"] = baseline(task, gold["test"], data.label_names)

    info = {"task": describe(cfg.data, data.label_names, generation=bool(generators)),
            "baseline": {k: v for k, v in progress["baseline"].items() if k != "generations"},
            "parameters": counts, "data_sizes": {k: len(v) for k, v in data.splits.items()},
            "model_resolved": {"pooling": pooling_of(cfg.model, task.head)},
            "device": str(device), "distributed": dist.describe()}
    if task.name == "classification":  # kept for tools that read records written before "baseline"
        info["majority_class_test_accuracy"] = info["baseline"]["test"]["accuracy"]
    tracker.summary({**{f"parameters/{k}": v for k, v in counts.items()},
                     **{f"task/{k}": info["task"][k] for k in ("name", "type", "main_metric")},
                     **{f"baseline/{k}": v for k, v in info["baseline"]["test"].items()}})
    say(f"[lora_lab] {method.name}: {counts['trainable']:,} trainable of {counts['total']:,} "
        f"({counts['trainable_percent']:.3f} %), {steps_per_epoch} steps/epoch"
        f"{f' of {accum} micro-batches' if accum > 1 else ''} on {device}"
        f"{f' x {dist.world_size} processes' if dist.enabled else ''}")

    segment_start = time.perf_counter()

    def write_checkpoint() -> Path | None:
        """Every rank takes part (each one's RNG state is saved); rank 0 writes."""
        nonlocal segment_start
        written = time.perf_counter()
        progress["train_seconds"] += written - segment_start
        progress["throughput"] = throughput.state()
        rng_states = dist.gather(checkpoint.rng_state())
        if dist.enabled:
            progress["throughput_ranks"] = dist.gather(throughput.state())
        path = None
        if main_rank:
            series = {"epoch_losses": torch.tensor(losses, dtype=torch.float64),
                      "step_seconds": torch.tensor(throughput.step_times, dtype=torch.float64)}
            path = checkpoint.save(checkpoint_dir, model, optimizer, scheduler, config, progress, series, rng_states)
            checkpoint.drop_stale_best(checkpoint_dir, progress["best_epoch"])
        dist.barrier()  # a rank that stops next must not end the launch while rank 0 writes
        segment_start = time.perf_counter()
        progress["checkpoint_seconds"] += segment_start - written
        progress["checkpoints_written"] += 1
        return path

    if saved is not None:
        checkpoint.restore_rng(saved, dist.rank)  # last: setting up drew random numbers (model init, method init)
    peak = measure.PeakMemory(device)
    peak.reset()
    while not progress["training_done"]:
        epoch = progress["epoch"]
        batches.set_epoch(epoch, start=progress["batch"])
        train_model.train()
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{tcfg.epochs}", leave=False, initial=progress["batch"],
                   total=batches_per_epoch, disable=_progress_disabled(tcfg.progress_bar) if main_rank else True,
                   dynamic_ncols=True)
        for batch in bar:
            micro = progress["batch"] % accum  # position in the optimiser step's group of micro-batches
            if micro == 0:  # checkpoints and stops fall between optimiser steps, never inside a group
                if progress["step"] >= total_steps:
                    break
                if dist.sum([stop.signum is not None])[0]:  # every rank stops at the same step
                    raise Preempted(stop.signum or signal.SIGTERM, progress["step"],
                                    write_checkpoint() if every else None)
            group = min(accum, batches_per_epoch - (progress["batch"] - micro))  # an epoch's last may be short
            stepping = micro + 1 == group
            examples = batches.counted(progress["batch"])  # 0: a stand-in that only keeps DDP in step
            batch = to_device(batch, device)
            with throughput.step(batch, examples), (nullcontext() if stepping or not dist.enabled
                                                    else train_model.no_sync()):
                with amp():
                    loss = training_loss(train_model(**batch), batch, task.head, tcfg.get("label_smoothing") or 0.0)
                loss_value, weight = global_loss(loss, batch, examples, task, dist)
                if not math.isfinite(loss_value):
                    raise Diverged(progress["step"] + 1, loss_value)
                (loss * weight / group).backward()  # the group's mean loss, as one batch of group x batch_size
                if stepping:
                    if tcfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            progress["batch"] += 1
            losses.append(loss_value)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if not stepping:
                continue
            progress["step"] += 1
            step = progress["step"]
            if step % tcfg.log_every == 0:
                tracker.log({"train/loss": statistics.fmean(losses[-group:]), "train/lr": scheduler.get_last_lr()[0],
                             "train/epoch": epoch}, step=step)
            if every and step % every == 0 and progress["batch"] < batches_per_epoch and step < total_steps:
                write_checkpoint()  # (an epoch's last step is checkpointed after its evaluation)

        progress["peaks"]["train"] = measure.higher_peak(progress["peaks"]["train"],
                                                         measure.combine_ranks(dist.gather(peak.read())))
        peak.reset()
        val, val_report, val_latency = evaluate(model, eval_loaders["validation"], gold["validation"], device,
                                                amp, task, data.label_names, dist=dist)
        test, test_report, _ = evaluate(model, eval_loaders["test"], gold["test"], device, amp, task,
                                        data.label_names, dist=dist)
        if val_report or test_report:
            progress["reports"][str(epoch)] = {"validation": val_report, "test": test_report}
        generated = {}
        for split, metrics in (("validation", val), ("test", test)):
            if split in generators:
                scores, generated[split] = generators[split].run(model, device, amp, dist)
                metrics.update(scores)
        progress["peaks"]["eval"] = measure.higher_peak(progress["peaks"]["eval"],
                                                        measure.combine_ranks(dist.gather(peak.read())))
        progress["eval_batch_ms_median"] = statistics.median(val_latency) if val_latency else None
        row = _epoch_row(epoch, progress["step"], statistics.fmean(losses) if losses else float("nan"), val, test)
        progress["epochs"].append(row)
        tracker.log({k: v for k, v in row.items() if k != "step"}, step=progress["step"])
        best = progress["best"]
        if best is None or is_better(monitor, val[monitor], best[f"validation/{monitor}"]):
            progress.update(best=row, best_epoch=epoch, stale_epochs=0)
            best_state = _clone_state(model)
            if every and main_rank:
                checkpoint.save_best(checkpoint_dir, best_state, epoch)
        else:
            progress["stale_epochs"] += 1
        if generated:  # kept for the best epoch and the latest one only
            progress["generations"] = {k: v for k, v in progress["generations"].items()
                                       if k == str(progress["best_epoch"])}
            progress["generations"][str(epoch)] = generated
        say(f"[lora_lab] epoch {epoch}: loss {row['train_loss']:.4f}  "
            f"val {monitor} {val[monitor]:.4f}  test {monitor} {test[monitor]:.4f}")
        progress.update(epoch=epoch + 1, batch=0)
        losses = []
        patience = tcfg.get("patience")
        if progress["step"] >= total_steps or epoch >= tcfg.epochs:
            progress["training_done"] = True
        elif patience and progress["stale_epochs"] >= patience:
            progress.update(training_done=True, stopped_early=True)
            say(f"[lora_lab] stopping early: validation {monitor} has not improved for {patience} epochs")
        if every:
            write_checkpoint()
        else:
            progress["train_seconds"] += time.perf_counter() - segment_start
            segment_start = time.perf_counter()
        peak.reset()

    throughput_ranks = dist.gather(throughput.state())
    record = None
    if main_rank:
        record = _finish(cfg, run_dir, model, method, progress, best_state, throughput, info, eval_loaders, device,
                         tracker, checkpoint_dir, amp, throughput_ranks)
    return dist.broadcast(record)  # every rank returns rank 0's record (e.g. to a Hydra sweeper)


def wrap_distributed(model, method, dist: Distributed, device: torch.device):
    """DistributedDataParallel over the ranks (the model itself in one process): gradients of the
    trainable parameters are averaged across ranks after every optimiser step's last micro-batch."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=method.needs_unused_parameter_search)


def loss_terms(batch: dict, examples: int, task: TaskType) -> int:
    """How many terms a batch's mean loss averages: its examples, its labelled tokens for tagging, its
    predicted tokens (labelled positions after the first, as the causal shift leaves them) for a
    causal LM; none for a stand-in batch (no examples)."""
    if not examples or task.head not in ("token", "lm"):
        return examples
    labels = batch["labels"][:, 1:] if task.head == "lm" else batch["labels"]
    return int((labels != IGNORED).sum())


def global_loss(loss: torch.Tensor, batch: dict, examples: int, task: TaskType,
                dist: Distributed) -> tuple[float, float]:
    """The loss of the whole global micro-batch (as one process with ``world_size`` times the batch
    would compute it) and this rank's weight for its own loss. Each rank's loss is a mean over its
    loss terms (``loss_terms``: examples, labelled tokens or predicted tokens); weighting it by its
    share of the global count, times world_size (DDP averages gradients over ranks), makes the
    gradient that of the global mean."""
    value = loss.item()
    if not dist.enabled:
        return value, 1.0
    terms = loss_terms(batch, examples, task)
    total, loss_sum, bad = dist.sum([terms, value * terms, 0.0 if math.isfinite(value) else 1.0])
    if bad:
        return float("nan"), 0.0
    return loss_sum / total, terms * dist.world_size / total


def _finish(cfg, run_dir, model, method, progress, best_state, throughput, info, eval_loaders, device, tracker,
            checkpoint_dir, amp, throughput_ranks: list[dict]) -> dict:
    """Save the best epoch's state and ΔW (and the last epoch's state when it differs), measure
    inference, write the record (rank 0 only). Repeating it after a kill gives the same files."""
    tcfg = cfg.trainer
    epochs, best = progress["epochs"], progress["best"]
    best_epoch, last_epoch = progress["best_epoch"], epochs[-1]["epoch"]
    files = {records.STATE_FILE: {"epoch": best_epoch, "holds": "best"}}
    if best_epoch != last_epoch:
        records.save_tensors(run_dir / records.LAST_STATE_FILE, checkpoint.trainable_state(model),
                             metadata={"method": method.name, "epoch": str(last_epoch)})
        files[records.LAST_STATE_FILE] = {"epoch": last_epoch, "holds": "last"}
    else:
        (run_dir / records.LAST_STATE_FILE).unlink(missing_ok=True)
    checkpoint.load_trainable_state(model, best_state)
    records.save_tensors(run_dir / records.STATE_FILE, checkpoint.trainable_state(model),
                         metadata={"method": method.name, "epoch": str(best_epoch)})
    delta_shapes = None
    if cfg.record.save_delta_w:
        deltas = method.delta_weights(model)
        records.save_delta_weights(run_dir / records.DELTA_FILE, deltas)
        files[records.DELTA_FILE] = {"epoch": best_epoch, "holds": "best"}
        delta_shapes = records.delta_shapes(deltas)

    peaks = progress["peaks"]
    steps = max(progress["step"], 1)
    measurements = {**peaks["train"], **{f"eval_{k}": v for k, v in peaks["eval"].items() if k != "memory_at_start_mb"},
                    **throughput.summary(), **measure.throughput_over_ranks(throughput_ranks),
                    "train_seconds": progress["train_seconds"],
                    "eval_batch_ms_median": progress["eval_batch_ms_median"],
                    "checkpoints_written": progress["checkpoints_written"],
                    "checkpoint_seconds": progress["checkpoint_seconds"],
                    "checkpoint_ms_per_step": 1000 * progress["checkpoint_seconds"] / steps}
    measurements.update(_inference_latency(model, method, eval_loaders["validation"], device, tcfg, amp))
    measurements["trainable_state_bytes"] = (run_dir / records.STATE_FILE).stat().st_size

    record = {
        "schema_version": records.SCHEMA_VERSION,
        "status": "completed",
        "method": method.name,
        "method_resolved": method.resolved,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "epochs": epochs,
        "best": best,
        "last": epochs[-1],
        "stopped_early": progress["stopped_early"],
        "resumes": progress["resumes"],
        "files": files,
        "measurements": measurements,
        **({"delta_w_shapes": delta_shapes} if delta_shapes is not None else {}),
        **_reports(progress, best_epoch, last_epoch),
        **_generations(progress, best_epoch, last_epoch),
        **info,
        "environment": environment_info(),
    }
    records.write_json(run_dir / records.RECORD_FILE, record)
    tracker.log_model(run_dir, record)  # logger.log_model=true: the state (and PEFT adapter) as a W&B artifact
    if not tcfg.get("keep_checkpoint", False) and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    monitor = record["task"]["main_metric"]
    # the main metric, whatever the task, as a number to maximise (sweeps maximise it): negated for a
    # metric that is better lower, so the objective of a perplexity of 12 is -12
    tracker.summary({**{f"best/{k}": v for k, v in best.items()}, **{f"last/{k}": v for k, v in epochs[-1].items()},
                     **{f"measure/{k}": v for k, v in measurements.items()},
                     "objective": objective(monitor, best[f"validation/{monitor}"])})
    if "reports" in record:
        columns, rows = report_rows(record["reports"]["best"])
        tracker.log_table("best/report", columns, rows)
    if "generations" in record:
        columns, rows = generation_rows(record["generations"])
        tracker.log_table("best/generations", columns, rows)
    return record


def _reports(progress: dict, best_epoch: int, last_epoch: int) -> dict:
    """The per-class reports (tagging: per entity type) of the best and the last epoch, if the task has them."""
    reports = progress.get("reports") or {}
    if str(best_epoch) not in reports:
        return {}
    return {"reports": {"best": reports[str(best_epoch)], "last": reports.get(str(last_epoch))}}


def _generations(progress: dict, best_epoch: int, last_epoch: int) -> dict:
    """The generations kept (``trainer.generation.keep_examples`` per split) of the pre-trained model,
    the best epoch and the last, if the run generated."""
    kept = progress.get("generations") or {}
    baseline = (progress.get("baseline") or {}).get("generations")
    out = {name: kept[str(epoch)] for name, epoch in (("best", best_epoch), ("last", last_epoch)) if str(epoch) in kept}
    if baseline:
        out["baseline"] = baseline
    return {"generations": out} if out else {}


def generation_rows(generations: dict) -> tuple[list[str], list[list]]:
    """The kept generations as table rows (model, split, prompt, references, generation), for W&B."""
    rows = [[model, split, g["prompt"], "\n".join(g["references"]), g["generation"]]
            for model in ("baseline", "best") for split, examples in (generations.get(model) or {}).items()
            for g in examples]
    return ["model", "split", "prompt", "references", "generation"], rows


def report_rows(report: dict) -> tuple[list[str], list[list]]:
    """A report as table rows (split, class, precision, recall, F1, support), for W&B."""
    rows = [[split, name, r["precision"], r["recall"], r["f1"], r["support"]]
            for split, classes in report.items() for name, r in classes.items()]
    return ["split", "class", "precision", "recall", "f1", "support"], rows


def _inference_latency(model, method, loader, device, tcfg, amp) -> dict:
    """Forward latency of one training-size batch; for methods that merge, unmerged vs merged,
    interleaved round by round."""
    batch = to_device(next(iter(loader)), device)
    inputs = {k: v[: tcfg.batch_size] for k, v in batch.items() if k != "labels"}
    model.eval()
    enter = ({"unmerged": lambda: method.undo_inference(model), "merged": lambda: method.prepare_inference(model)}
             if method.supports_merge else {"model": lambda: None})
    with torch.no_grad(), amp():
        times = round_robin({name: (lambda k: model(**inputs)) for name in enter}, int(tcfg.latency_repeats),
                            warmup=1, device=device, enter=enter)
    method.undo_inference(model)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    if not method.supports_merge:
        return {"inference_ms": ms["model"]}
    return {"inference_ms": ms["merged"], "inference_unmerged_ms": ms["unmerged"], "inference_merged_ms": ms["merged"],
            "merged_over_unmerged": ms["merged"] / ms["unmerged"]}
