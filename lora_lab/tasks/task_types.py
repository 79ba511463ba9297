"""What a task is: its type, the metrics it reports, its main metric and the baseline a trained model
must beat. The trainer's best-epoch choice, the run record, the W&B summary, the sweeps' objective and
the tables all read a task's metrics from here; a data config names its type (``data.task_type``) and
may choose another of that type's metrics as its main one (``data.main_metric``).

    classification         one label per text (pair)    accuracy, macro_f1, mcc          baseline: majority class
    regression             one number per text (pair)   pearson, spearman                baseline: a constant
    token_classification   one BIO tag per word (NER)   entity_f1, entity_precision,     baseline: all O
                                                        entity_recall, token_accuracy
    causal_lm              the next token of a text     perplexity, loss; with           baseline: the pre-
                           (or of a prompt's response)  trainer.generation also bleu,    trained model
                                                        rouge_l

Metrics are better higher except the causal LM's perplexity and loss (lora_lab.tasks.metrics.higher_is_better);
``objective`` turns any main metric into a number to maximise, for sweepers that only maximise.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from lora_lab.errors import ConfigError
from lora_lab.tasks.metrics import (
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    LM_METRICS,
    REGRESSION_METRICS,
    TOKEN_METRICS,
    classification_metrics,
    entity_metrics,
    higher_is_better,
    lm_metrics,
    regression_metrics,
)

OUTSIDE = "O"  # the tag of a word outside every entity


@dataclass(frozen=True)
class TaskType:
    name: str
    metrics: tuple[str, ...]
    default_metric: str
    baseline: str  # what the baseline predicts
    head: str      # "sequence": one output per example; "token": one per word; "lm": the next token
    optional_metrics: tuple[str, ...] = ()  # reported only when the run computes them (generation)

    def higher_is_better(self, metric: str) -> bool:
        return higher_is_better(metric)

    def score(self, gold: list, predictions: list, label_names: list[str]) -> tuple[dict[str, float], dict]:
        """The metrics of ``predictions`` against ``gold``, and a per-class report (empty when the type
        has none). Tagging: gold and predictions are per-sentence lists of tag ids, one per word; a
        prediction list shorter than its sentence (the words cut by ``data.max_length``) counts the
        missing words as O. Causal LM: gold is each example's number of predicted tokens, predictions
        its summed negative log-likelihood over them."""
        if self.name == "causal_lm":
            return lm_metrics(gold, predictions), {}
        if self.name == "regression":
            return regression_metrics(gold, predictions), {}
        if self.name == "classification":
            return classification_metrics(gold, predictions), {}
        outside = label_names.index(OUTSIDE)
        gold_tags = [[label_names[i] for i in sentence] for sentence in gold]
        predicted_tags = [[label_names[i] for i in (list(p) + [outside] * (len(g) - len(p)))[: len(g)]]
                          for g, p in zip(gold, predictions)]
        return entity_metrics(gold_tags, predicted_tags)

    def baseline_predictions(self, gold: list, label_names: list[str]) -> list:
        """What the baseline predicts for ``gold``: its most frequent class, its mean, or O everywhere. (A
        causal LM's baseline is no prediction rule but the pre-trained model, evaluated by the trainer.)"""
        if self.head == "lm":
            raise ValueError("the causal LM baseline is the pre-trained model's evaluation, not a prediction rule")
        if self.name == "regression":
            return [statistics.fmean(gold)] * len(gold)
        if self.name == "classification":
            majority = max(set(gold), key=lambda c: (gold.count(c), -c))
            return [majority] * len(gold)
        outside = label_names.index(OUTSIDE)
        return [[outside] * len(sentence) for sentence in gold]


TASK_TYPES = {t.name: t for t in (
    TaskType("classification", CLASSIFICATION_METRICS, "accuracy", "majority class", "sequence"),
    TaskType("regression", REGRESSION_METRICS, "pearson", "constant", "sequence"),
    TaskType("token_classification", TOKEN_METRICS, "entity_f1", "all O", "token"),
    TaskType("causal_lm", LM_METRICS, "perplexity", "pre-trained model", "lm", GENERATION_METRICS),
)}


def task_type(data_cfg) -> TaskType:
    name = data_cfg.get("task_type") or "classification"
    if name not in TASK_TYPES:
        raise ConfigError("data.task_type", name, f"must be one of {list(TASK_TYPES)}")
    return TASK_TYPES[name]


def main_metric(data_cfg) -> str:
    """The metric that picks the best epoch, that sweeps optimise and that tables show."""
    kind = task_type(data_cfg)
    metric = data_cfg.get("main_metric") or kind.default_metric
    if metric not in kind.metrics + kind.optional_metrics:
        raise ConfigError("data.main_metric", metric, f"must be one of {list(kind.metrics + kind.optional_metrics)} "
                          f"for data.task_type={kind.name} (null: {kind.default_metric})")
    return metric


def objective(metric: str, value: float) -> float:
    """The number a sweep maximises for ``value`` of ``metric``: the value itself, negated for a metric
    that is better lower (perplexity, loss), so "maximise the objective" always means "best"."""
    return value if higher_is_better(metric) else -value


def task_name(data_cfg) -> str:
    """The task's name in tables: a Hub data set's subset (GLUE task), else the data set's name."""
    return str(data_cfg.get("subset") or data_cfg.get("name") or "task")


def describe(data_cfg, label_names: list[str], generation: bool = False) -> dict:
    """The run record's ``task`` block: ``metrics`` lists those the run reports (``generation``: with
    the generation metrics)."""
    kind = task_type(data_cfg)
    metrics = list(kind.metrics) + (list(kind.optional_metrics) if generation else [])
    return {"name": task_name(data_cfg), "type": kind.name, "metrics": metrics,
            "main_metric": main_metric(data_cfg), "label_names": list(label_names)}
