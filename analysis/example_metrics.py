"""A task's metrics recomputed from per-example fields (lora_lab.runtime.predictions), for many
resamples at once: every field arrives gathered with shape (..., n) (n examples of one resample) and
each metric returns shape (...). On all the examples of a split they equal what the trainer reported
(scikit-learn's accuracy, macro F1 and MCC, SciPy's correlations, seqeval's entity scores, the
token-weighted loss), which ``check_against`` verifies for every file a table reads."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from lora_lab.errors import ConfigError

METRICS = {
    "classification": ("accuracy", "macro_f1", "mcc"),
    "regression": ("pearson", "spearman"),
    "token_classification": ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
    "causal_lm": ("loss", "perplexity"),
}
TOLERANCE = 1e-4  # float32 fields against the float64 values of the record


def supports(task_type: str, metric: str) -> bool:
    return metric in METRICS.get(task_type, ())


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (the scorers' zero_division=0)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _confusion(label: np.ndarray, prediction: np.ndarray, classes: int) -> np.ndarray:
    """Per resample, the confusion counts [true class, predicted class]: shape (..., K, K)."""
    lead = label.shape[:-1]
    codes = (label * classes + prediction).reshape(-1, label.shape[-1])
    offsets = np.arange(codes.shape[0])[:, None] * classes * classes
    counts = np.bincount((codes + offsets).ravel(), minlength=codes.shape[0] * classes * classes)
    return counts.reshape(*lead, classes, classes)


def _classification(metric: str, label: np.ndarray, prediction: np.ndarray, classes: int) -> np.ndarray:
    if metric == "accuracy":
        return (label == prediction).mean(-1)
    c = _confusion(label, prediction, classes).astype(np.float64)
    true, predicted, hits = c.sum(-1), c.sum(-2), np.diagonal(c, axis1=-2, axis2=-1)
    if metric == "macro_f1":  # over the classes present in the gold or the predicted labels
        present = (true + predicted) > 0
        return _ratio((_ratio(2 * hits, true + predicted) * present).sum(-1), present.sum(-1))
    total, correct = c.sum((-2, -1)), hits.sum(-1)
    covariance = correct * total - (true * predicted).sum(-1)
    spread = (total ** 2 - (predicted ** 2).sum(-1)) * (total ** 2 - (true ** 2).sum(-1))
    return _ratio(covariance, np.sqrt(spread))


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Correlation per resample; 0 where either side is constant (regression_metrics' "no skill")."""
    x, y = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    constant = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    r = _ratio((x * y).sum(-1), np.sqrt((x * x).sum(-1) * (y * y).sum(-1)))
    return np.where(constant, 0.0, r)


def metric_values(task_type: str, metric: str, fields: dict[str, np.ndarray], classes: int = 0) -> np.ndarray:
    """``metric`` of each resample; ``fields`` gathered (..., n). ``classes``: the number of class ids
    (classification: at least one more than the largest id in either field)."""
    if task_type == "classification":
        return _classification(metric, fields["label"].astype(np.int64), fields["prediction"].astype(np.int64),
                               classes)
    if task_type == "regression":
        x, y = fields["label"].astype(np.float64), fields["prediction"].astype(np.float64)
        if metric == "spearman":
            x, y = rankdata(x, axis=-1), rankdata(y, axis=-1)
        return _pearson(x, y)
    if task_type == "token_classification":
        tp, fp, fn = (fields[k].sum(-1).astype(np.float64) for k in ("tp", "fp", "fn"))
        if metric == "token_accuracy":
            return _ratio(fields["correct_tokens"].sum(-1).astype(np.float64), fields["tokens"].sum(-1))
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        return {"entity_precision": precision, "entity_recall": recall,
                "entity_f1": _ratio(2 * precision * recall, precision + recall)}[metric]
    if task_type == "causal_lm":
        loss = _ratio(fields["nll"].astype(np.float64).sum(-1), fields["tokens"].sum(-1).astype(np.float64))
        if metric == "loss":
            return loss
        with np.errstate(over="ignore"):
            return np.exp(loss)
    raise ValueError(f"no per-example metric {metric!r} for task type {task_type!r}")


def class_count(fields: dict[str, np.ndarray]) -> int:
    return int(max(fields["label"].max(initial=0), fields["prediction"].max(initial=0))) + 1


def check_against(predictions, metric: str, reported: float) -> None:
    """Refuse (ConfigError naming the file) per-example results that do not give the metric the record
    reports: they would be another epoch's or another run's."""
    fields = predictions.fields
    classes = class_count(fields) if predictions.task_type == "classification" else 0
    value = float(metric_values(predictions.task_type, metric, fields, classes))
    if not math.isclose(value, reported, rel_tol=TOLERANCE, abs_tol=TOLERANCE):
        raise ConfigError("predictions", str(predictions.path),
                          f"gives test {metric} {value:.6g}, but its record reports {reported:.6g} for that epoch")
