"""Predicting and scoring one split, and the baselines a run is compared with.

A causal LM (task head "lm") is scored by its token-weighted loss and perplexity; its baseline is the
pre-trained model itself, evaluated on test before the method is applied, and with
``trainer.generation.enabled`` its greedy generations add BLEU and ROUGE-L (lora_lab.tasks.generation_eval).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from lora_lab.data import lm_data
from lora_lab.data.columns import column_values
from lora_lab.data.loading import Collator, TaskData
from lora_lab.data.sampling import evaluation_loader
from lora_lab.data.token_data import IGNORED
from lora_lab.models import quantization
from lora_lab.runtime.distributed import Distributed
from lora_lab.runtime.timing import synchronize
from lora_lab.tasks import generation_eval
from lora_lab.tasks.losses import sequence_nll
from lora_lab.tasks.task_types import TaskType

SPLITS = ("validation", "test")
ONE_PROCESS = Distributed()


@dataclass
class EvaluationSplits:
    """What evaluating a run needs, per split (validation and test)."""
    loaders: dict[str, DataLoader]
    gold: dict[str, list]  # what predictions are scored against (``gold_labels``)
    generators: dict[str, generation_eval.SplitGeneration]  # the splits generated on after every epoch


def evaluation_splits(cfg, data: TaskData, tokenizer, collator: Collator, monitor: str) -> EvaluationSplits:
    loaders = {split: evaluation_loader(data.splits[split], cfg.trainer.eval_batch_size, collator) for split in SPLITS}
    gold = {split: gold_labels(data.splits[split], data.task) for split in loaders}
    return EvaluationSplits(loaders, gold, generation_splits(cfg, data, tokenizer, monitor))


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
            dist: Distributed = ONE_PROCESS) -> tuple[list, list[float]]:
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
    if dist.sharded:
        _keep_in_step(model, loader, device, amp, dist, len(per_batch))
    if dist.enabled:  # rank r predicted batches r, r + world_size, ...: interleave them back
        shares = dist.gather(per_batch)
        per_batch = [shares[i % dist.world_size][i // dist.world_size] for i in range(sum(map(len, shares)))]
    return [p for batch_predictions in per_batch for p in batch_predictions], latencies


def _keep_in_step(model, loader, device, amp, dist: Distributed, done: int) -> None:
    """A sharded model (``trainer.strategy=fsdp``) gathers each block's parameters from every rank in
    every forward pass, so every rank runs as many as the rank with the most batches: a rank with fewer
    runs its missing ones on the split's first batch, and drops their output."""
    most = -(-len(loader.batch_sampler) // dist.world_size)
    if done < most:
        first = {k: v for k, v in to_device(next(iter(loader)), device).items() if k != "labels"}
        for _ in range(most - done):
            with amp():
                model(**first)


def gold_labels(dataset, task: TaskType) -> list:
    """What predictions are scored against: a label per example, every word's tag per sentence, or
    (causal LM) the number of tokens each example predicts, which weighs its summed loss."""
    if task.head == "lm":
        return [lm_data.predicted_tokens(labels) for labels in column_values(dataset, "labels")]
    return column_values(dataset, "word_labels" if task.head == "token" else "labels")


def evaluate(model, loader, gold: list, device, amp, task: TaskType, label_names: list[str],
             dist: Distributed = ONE_PROCESS) -> tuple[dict[str, float], dict, list[float], list]:
    """The task's metrics on one split, its per-class report (tagging: per entity type), the per-batch
    forward latency in ms (of this rank's batches) and the predictions themselves, in order."""
    predictions, latencies = predict(model, loader, device, amp, task, dist)
    metrics, report = task.score(gold, predictions, label_names)
    return metrics, report, latencies, predictions


def baseline(task: TaskType, gold: list, label_names: list[str]) -> dict:
    """The run record's ``baseline``: what predicting the majority class (a constant, O everywhere)
    scores on the test split. (A causal LM's is the pre-trained model: ``pretrained_baseline``.)"""
    metrics, _ = task.score(gold, task.baseline_predictions(gold, label_names), label_names)
    return {"name": task.baseline, "test": metrics}


def pretrained_baseline(model, loader, gold: list, device, amp, task: TaskType, dist: Distributed,
                        generation: generation_eval.SplitGeneration | None = None) -> dict:
    """The causal LM's ``baseline``: the test metrics of the model as loaded, before any method
    changes it (and its generations, with ``trainer.generation`` on test). The model goes back to
    the CPU afterwards and the random state is restored, so the method is set up exactly as in a run
    without this evaluation."""
    rng = torch.get_rng_state()
    quantization.to_device(model, device)
    metrics, _, _, _ = evaluate(model, loader, gold, device, amp, task, [], dist=dist)
    out = {"name": task.baseline, "test": metrics}
    if generation is not None:
        scores, examples = generation.run(model, device, amp, dist)
        metrics.update(scores)
        out["generations"] = {"test": examples}
    quantization.to_device(model, "cpu")
    torch.set_rng_state(rng)
    return out


def generation_splits(cfg, data: TaskData, tokenizer, monitor: str) -> dict[str, generation_eval.SplitGeneration]:
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
            for split in SPLITS if split in splits}
