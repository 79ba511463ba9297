"""The metrics of each task type: classification (scikit-learn), regression correlations (STS-B style),
entity-level precision / recall / F1 for tagging (seqeval, CoNLL evaluation rules) and the token-level
loss and perplexity of a causal language model (BLEU and ROUGE-L of its generations:
lora_lab.tasks.generation_eval). Every metric is better higher except those in ``MINIMISED_METRICS``."""
from __future__ import annotations

import math

import seqeval.metrics as seqeval
import sklearn.metrics as sklearn_metrics
from scipy.stats import pearsonr, spearmanr

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
TOKEN_METRICS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
LM_METRICS = ("perplexity", "loss")
GENERATION_METRICS = ("bleu", "rouge_l")  # reported only when trainer.generation.enabled
MINIMISED_METRICS = frozenset({"perplexity", "loss"})
# shown as they are in tables (BLEU is already 0-100; perplexity and loss are unbounded); the others,
# fractions in [0, 1] or correlations, are shown x100 as papers do
UNSCALED_METRICS = frozenset({"bleu", "perplexity", "loss"})


# How headers and captions name a metric; any other reads as its name with spaces.
METRIC_NAMES = {"macro_f1": "macro F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman",
                "entity_f1": "entity F1"}


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric.replace("_", " "))


def display_scale(metric: str) -> float:
    return 1.0 if metric in UNSCALED_METRICS else 100.0


def higher_is_better(metric: str) -> bool:
    """The direction of a metric: what picks the best epoch, the best tuned value and a table's bold."""
    return metric not in MINIMISED_METRICS


def is_better(metric: str, value: float, than: float | None) -> bool:
    """``value`` beats ``than`` (None: nothing to beat yet) in ``metric``'s direction; NaN never wins."""
    if value is None or math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value > than if higher_is_better(metric) else value < than


def lm_metrics(token_counts: list[int], nll_sums: list[float]) -> dict[str, float]:
    """The mean negative log-likelihood per predicted token over a whole split (each example's summed
    NLL over its predicted tokens, so long examples weigh as many tokens as they predict), and its
    exponential, the perplexity."""
    tokens = sum(token_counts)
    if not tokens:
        return {"loss": math.nan, "perplexity": math.nan}
    loss = math.fsum(nll_sums) / tokens
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return {"loss": loss, "perplexity": perplexity}


def classification_metrics(labels, predictions) -> dict[str, float]:
    return {
        "accuracy": float(sklearn_metrics.accuracy_score(labels, predictions)),
        "macro_f1": float(sklearn_metrics.f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(sklearn_metrics.matthews_corrcoef(labels, predictions)),
    }


def regression_metrics(targets, predictions) -> dict[str, float]:
    if len(set(predictions)) < 2 or len(set(targets)) < 2:  # correlation undefined: report no skill
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(targets, predictions)[0]),
            "spearman": float(spearmanr(targets, predictions)[0])}


def entity_metrics(gold_tags: list[list[str]], predicted_tags: list[list[str]]) -> tuple[dict[str, float], dict]:
    """Entity-level micro precision / recall / F1 (an entity counts only when its type and both
    boundaries are right), token accuracy over all words, and the per-type report:
    ``{type: {"precision", "recall", "f1", "support"}}`` plus ``micro avg`` and ``macro avg``."""
    words = sum(len(s) for s in gold_tags)
    correct = sum(g == p for gs, ps in zip(gold_tags, predicted_tags) for g, p in zip(gs, ps))
    metrics = {
        "entity_f1": float(seqeval.f1_score(gold_tags, predicted_tags, zero_division=0)),
        "entity_precision": float(seqeval.precision_score(gold_tags, predicted_tags, zero_division=0)),
        "entity_recall": float(seqeval.recall_score(gold_tags, predicted_tags, zero_division=0)),
        "token_accuracy": correct / words if words else 0.0,
    }
    if not any(t != "O" for tags in (*gold_tags, *predicted_tags) for t in tags):
        return metrics, {}  # no entity anywhere: seqeval's averages would be NaN
    raw = seqeval.classification_report(gold_tags, predicted_tags, output_dict=True, zero_division=0)
    report = {name: {"precision": float(row["precision"]), "recall": float(row["recall"]),
                     "f1": float(row["f1-score"]), "support": int(row["support"])}
              for name, row in raw.items() if name != "weighted avg"}
    return metrics, report
