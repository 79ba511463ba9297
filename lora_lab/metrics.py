"""Classification metrics (scikit-learn) and regression correlations (STS-B style)."""
from __future__ import annotations

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def check_monitor(monitor: str, regression: bool) -> None:
    """The validation metric that picks the best epoch must be one the task's data produces."""
    from lora_lab.errors import ConfigError

    allowed = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    if monitor not in allowed:
        kind = "regression" if regression else "classification"
        raise ConfigError("trainer.monitor", monitor, f"must be one of {list(allowed)} for {kind} data")


def classification_metrics(labels, predictions) -> dict[str, float]:
    # imported here: scikit-learn adds about a second to every run's start-up
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def majority_class_accuracy(labels) -> float:
    labels = list(labels)
    return max(labels.count(v) for v in set(labels)) / len(labels)


def regression_metrics(targets, predictions) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(set(predictions)) < 2 or len(set(targets)) < 2:  # correlation undefined: report no skill
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(targets, predictions)[0]),
            "spearman": float(spearmanr(targets, predictions)[0])}
