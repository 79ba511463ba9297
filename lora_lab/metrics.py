"""Classification metrics (scikit-learn)."""
from __future__ import annotations

METRICS = ("accuracy", "macro_f1", "mcc")


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
