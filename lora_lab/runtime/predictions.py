"""Per-example test results of a run's reported epoch: ``predictions.safetensors`` beside the record.

The tables resample test examples from this file to give one seed an interval, and pair two methods
example by example. It holds, per task type, only what recomputes the task's metrics on any subset of
the examples (one 1-D tensor per field, one entry per test example; a few bytes each):

    classification         label, prediction (int32 class ids)                           8 bytes
    regression             label, prediction (float32)                                   8 bytes
    token_classification   per sentence: tp, fp, fn (entities found, spurious, missed;
                           CoNLL rules, as seqeval counts them), correct_tokens, tokens  20 bytes
    causal_lm              nll (float32, the example's summed negative log-likelihood),
                           tokens (int32, the tokens it predicts)                        8 bytes

Its metadata names the task type, the split ("test") and the epoch; the record's ``files`` lists it
with that epoch, as for the other files. Generation metrics (BLEU, ROUGE-L) are not per-example
decomposable here: tables give them seed-only intervals.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from seqeval.metrics.sequence_labeling import get_entities

from lora_lab.errors import ConfigError
from lora_lab.runtime.records import save_tensors
from lora_lab.tasks.task_types import OUTSIDE
from lora_lab.tensor_files import UnreadableTensors, read_header, read_tensors

# each task type's fields and their safetensors dtypes
FIELDS = {
    "classification": {"label": "I32", "prediction": "I32"},
    "regression": {"label": "F32", "prediction": "F32"},
    "token_classification": {"tp": "I32", "fp": "I32", "fn": "I32", "correct_tokens": "I32", "tokens": "I32"},
    "causal_lm": {"nll": "F32", "tokens": "I32"},
}
# the fields that are the same for two runs on the same test examples (what pairs them)
GOLD_FIELDS = {"classification": ("label",), "regression": ("label",), "token_classification": ("tp", "fn"),
               "causal_lm": ("tokens",)}
_TORCH = {"I32": torch.int32, "F32": torch.float32}


def entity_counts(gold: list[int], predicted: list[int], label_names: list[str]) -> tuple[int, int, int, int]:
    """One sentence's (entities found, spurious, missed, correctly tagged words). ``predicted`` may be
    shorter than the sentence (words cut by data.max_length): the missing words count as O, as the
    task's scoring has it."""
    outside = label_names.index(OUTSIDE)
    predicted = (list(predicted) + [outside] * (len(gold) - len(predicted)))[: len(gold)]
    gold_tags, predicted_tags = [label_names[i] for i in gold], [label_names[i] for i in predicted]
    true, found = set(get_entities(gold_tags)), set(get_entities(predicted_tags))
    hits = len(true & found)
    return hits, len(found) - hits, len(true) - hits, sum(g == p for g, p in zip(gold, predicted))


def example_fields(task_type: str, gold: list, predictions: list, label_names: list[str]) -> dict[str, np.ndarray]:
    """The file's fields for one split, from what the trainer scores (``gold`` and ``predictions`` as
    ``TaskType.score`` takes them)."""
    if task_type == "token_classification":
        counts = np.array([entity_counts(g, p, label_names) + (len(g),) for g, p in zip(gold, predictions)],
                          dtype=np.int64).reshape(-1, 5)
        return dict(zip(FIELDS[task_type], counts.T))
    if task_type == "causal_lm":
        return {"nll": np.asarray(predictions, dtype=np.float64), "tokens": np.asarray(gold)}
    if task_type in ("classification", "regression"):
        return {"label": np.asarray(gold), "prediction": np.asarray(predictions)}
    raise ValueError(f"no per-example fields for task type {task_type!r}")


def save_predictions(path: Path, task_type: str, fields: dict[str, np.ndarray], epoch: int) -> None:
    tensors = {name: torch.from_numpy(np.ascontiguousarray(fields[name])).to(_TORCH[dtype])
               for name, dtype in FIELDS[task_type].items()}
    save_tensors(path, tensors, metadata={"task_type": task_type, "split": "test", "epoch": str(epoch)})


@dataclass
class ExamplePredictions:
    """A checked predictions file: its task type, epoch and fields (NumPy arrays of equal length)."""
    task_type: str
    epoch: int
    fields: dict[str, np.ndarray]
    path: Path

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def pairs_with(self, other: ExamplePredictions) -> bool:
        """Whether two runs scored the same test examples in the same order (same task type, length and
        gold fields), so their results can be compared example by example."""
        return (self.task_type == other.task_type and len(self) == len(other)
                and all(np.array_equal(self.fields[f], other.fields[f]) for f in GOLD_FIELDS[self.task_type]))


def read_predictions(path: Path) -> ExamplePredictions:
    """A predictions file, checked: safetensors that parses, metadata naming a known task type and an
    epoch, exactly that type's fields, 1-D, of their dtypes and of one length, finite. Anything else
    is a ConfigError naming the file."""
    path = Path(path)

    def refuse(problem: str) -> ConfigError:
        return ConfigError("predictions", str(path), problem)

    try:
        header, metadata = read_header(path)
    except UnreadableTensors as error:
        raise refuse(f"cannot be read as safetensors ({error}); the file is truncated or corrupt") from None
    task_type = metadata.get("task_type")
    if task_type not in FIELDS:
        raise refuse(f"has task_type {task_type!r} in its metadata; expected one of {', '.join(FIELDS)}")
    epoch = metadata.get("epoch", "")
    if not epoch.isdigit():
        raise refuse(f"has epoch {epoch!r} in its metadata; expected the epoch number")
    if set(header) != set(FIELDS[task_type]):
        raise refuse(f"holds {sorted(header)}; a {task_type} file holds {sorted(FIELDS[task_type])}")
    lengths = set()
    for name, (shape, dtype) in header.items():
        if dtype != FIELDS[task_type][name] or len(shape) != 1:
            raise refuse(f"holds {name} as a {dtype} tensor of shape {list(shape)}; expected 1-D {FIELDS[task_type][name]}")
        lengths.add(shape[0])
    if len(lengths) != 1:
        raise refuse(f"holds fields of different lengths {sorted(lengths)}; one entry per test example each")
    try:
        fields = {name: tensor.numpy() for name, tensor in read_tensors(path).items()}
    except UnreadableTensors as error:
        raise refuse(f"cannot be read ({error}); the file is truncated or corrupt") from None
    if not all(np.isfinite(values).all() for values in fields.values()):
        raise refuse("holds non-finite values; the file is corrupt")
    return ExamplePredictions(task_type, int(epoch), fields, path)
