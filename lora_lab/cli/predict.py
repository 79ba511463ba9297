"""``lora-lab-predict RUN FILE``: a completed run's model predicting on new data, one output row per input row.

The model is rebuilt from the run's record (its config and seed: the base model, the method, then the
trained state of ``trainable.safetensors``, which holds the epoch the run reports, its best) and the
tokenizer loaded as the trainer loads it; every text is tokenised as in training (``data.max_length``,
the same truncation, batches of ``trainer.eval_batch_size``), so a run's own test split gives back its
test predictions exactly.

FILE is read as training reads ``data=files``: CSV, TSV, JSON or JSON Lines, with the run's
``data.text_column`` (and ``data.text_pair_column`` for pairs); a token classification run also reads
CoNLL (``.conll``, ``.txt``, ``.tsv``: a token per line, a blank line between sentences; the tag column
is optional) or table rows whose text column holds a list of words (or a string, split on whitespace).
A label column is optional and copied through like every other input column.

What is added to each row:

    classification (and pairs)   prediction (the label name), probability_<label> per class
    regression                   prediction (the number)
    token_classification         prediction (one tag per word; words cut off by data.max_length: O)
    causal_lm, plain text        nll (summed over the predicted tokens), tokens, perplexity
    causal_lm, prompt/response   generation (greedy or as trainer.generation decodes, up to its
                                 max_new_tokens); with the response column also the response's
                                 nll, tokens and perplexity

A causal LM reads the run's ``data.text_column``, or ``data.prompt_column`` (the response column is
optional), each formatted and cut as in training. The output is CSV or JSON Lines by the suffix of
``--out`` (default: beside FILE, ``<stem>.predictions.csv``); in CSV a list (words, tags) is a JSON
array. An existing output is replaced only with ``--force``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from lora_lab.data import lm_data
from lora_lab.data.columns import column_values
from lora_lab.data.loading import FILE_FORMATS, Collator, file_format, read_data_file
from lora_lab.data.token_data import IGNORED, align_labels
from lora_lab.errors import ConfigError
from lora_lab.runtime import records
from lora_lab.tasks import generation_eval
from lora_lab.tasks.losses import sequence_nll
from lora_lab.tasks.task_types import OUTSIDE, TaskType, task_type

PROG = "lora-lab-predict"
OUT_FORMATS = (".csv", ".jsonl")
PREDICTION = "prediction"
PROBABILITY = "probability_"  # + a label name: one column per class
LM_SCORES = ("nll", "tokens", "perplexity")
GENERATION = "generation"

EXAMPLE = """example (a seconds-long smoke run, then two new reviews):
  lora-lab experiment=smoke logger=disabled hydra.run.dir=outputs/smoke-run
  printf 'text\\nthe best film of the year\\na dull and lifeless mess\\n' > reviews.csv
  lora-lab-predict outputs/smoke-run reviews.csv       # writes reviews.predictions.csv
"""


@dataclass
class Predictor:
    """A completed run's model, ready to predict."""
    record: dict
    cfg: object  # the run's config (DictConfig)
    task: TaskType
    label_names: list[str]
    epoch: int  # the epoch whose state the model holds
    tokenizer: object
    model: nn.Module
    collator: Collator
    device: torch.device
    amp: object  # the run's autocast context

    @property
    def columns(self) -> list[str]:
        """The input columns the model reads."""
        return input_columns(self.cfg, self.task)


def input_columns(cfg, task: TaskType) -> list[str]:
    """The columns a run's model reads (a prompt/response causal LM: the prompt; the response is optional)."""
    data = cfg.data
    if task.head == "lm":
        return [data.prompt_column if lm_data.prompted(data) else data.text_column]
    return [data.text_column] + ([data.text_pair_column] if data.get("text_pair_column") else [])


def written_columns(cfg, task: TaskType, label_names: list[str]) -> list[str]:
    """The columns the predictions add."""
    if task.head == "lm":
        return [GENERATION, *LM_SCORES] if lm_data.prompted(cfg.data) else list(LM_SCORES)
    if task.name == "classification":
        return [PREDICTION, *(f"{PROBABILITY}{name}" for name in label_names)]
    return [PREDICTION]


def load_run(run_dir) -> tuple[dict, object, TaskType]:
    """A completed run's checked record, its config and task type; ConfigError when it cannot predict."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError("run", str(run_dir), "does not exist")
    if not run_dir.is_dir():
        raise ConfigError("run", str(run_dir), "is not a directory")
    record = records.load_record(run_dir)
    if records.record_version(record) < 2:
        raise ConfigError("run", str(run_dir), f"has a record of schema 1, whose {records.STATE_FILE} holds the last "
                          "epoch, not the reported one; train it again to predict")
    cfg = OmegaConf.create(record["config"])
    task = task_type(cfg.data)
    if cfg.model.get("trust_remote_code"):
        raise ConfigError("run", str(run_dir), f"was trained with model.trust_remote_code=true; {PROG} runs no "
                          "code from a model's repository")
    if task.head != "lm" and not record.get("task", {}).get("label_names"):
        raise ConfigError("run", str(run_dir), f"has a {records.RECORD_FILE} without the task's label names")
    if not (run_dir / records.STATE_FILE).is_file():
        raise ConfigError("run", str(run_dir), f"has no {records.STATE_FILE}; the run is incomplete")
    return record, cfg, task


def load_predictor(run_dir, device: str = "auto") -> Predictor:
    """The trained model of a completed run, rebuilt as the trainer built it, on ``device``."""
    from lora_lab.models import quantization
    from lora_lab.models.architectures import model_type
    from lora_lab.models.loading import is_causal_decoder, load_tokenizer
    from lora_lab.runtime.rebuild import rebuild_trained
    from lora_lab.trainer.setup import autocast_context

    record, cfg, task = load_run(run_dir)
    target = device_of(device)
    tokenizer = load_tokenizer(cfg.model)
    model = rebuild_trained(run_dir, record).model
    quantization.to_device(model, target)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = Collator(pad, cfg.data.padding, cfg.data.max_length,
                        torch.float if task.name == "regression" else torch.long)
    collator.token_types = not is_causal_decoder(model_type(model))
    labels = [str(name) for name in record["task"].get("label_names") or []]
    epoch = int(record["files"][records.STATE_FILE]["epoch"])
    return Predictor(record, cfg, task, labels, epoch, tokenizer, model.eval(), collator, target,
                     autocast_context(cfg, target))


def device_of(name: str) -> torch.device:
    """``--device`` as a torch device: auto, cpu, cuda or cuda:N."""
    from lora_lab.trainer.setup import resolve_device

    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError("--device", name, "must be auto, cpu, cuda or cuda:N")
    try:
        return resolve_device(name)
    except ConfigError as error:
        raise ConfigError("--device", name, error.problem) from None


# ---------------------------------------------------------------- input

def read_input(file, record: dict, cfg, task: TaskType) -> list[dict]:
    """The rows of ``file`` (every column), checked to hold the text the run's model reads."""
    path = Path(file)
    if path.is_dir():
        raise ConfigError("file", str(file), "is a directory, not a file")
    if not path.is_file():
        raise ConfigError("file", str(file), "does not exist")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ConfigError("file", str(file), f"must end in one of {', '.join(FILE_FORMATS)}")
    conll = file_format(suffix, cfg.data) == "conll"
    if conll and task.head != "token":
        raise ConfigError("file", str(file), f"is read as CoNLL columns (token TAB tag), which a {task.name} run "
                          "cannot read; give a CSV or JSON Lines file")
    datasets.disable_progress_bars()
    ds = read_data_file(str(path), cfg.data, "file", require_tags=False)
    columns = input_columns(cfg, task)
    for column in columns:
        if column not in ds.column_names:
            raise ConfigError("file", str(file), f"has no column {column!r}, which the run reads its text from; "
                              f"columns: {ds.column_names}")
    written = written_columns(cfg, task, [str(n) for n in record["task"].get("label_names") or []])
    taken = [c for c in ds.column_names if c in written]
    if taken:
        raise ConfigError("file", str(file), f"has a column {taken[0]!r}, a name the predictions are written under; "
                          "rename it")
    values = {c: column_values(ds, c) for c in ds.column_names}
    rows = [dict(zip(values, row)) for row in zip(*values.values())]
    for number, row in enumerate(rows, 1):
        for column in columns:
            row[column] = _checked_text(row[column], column, number, task, file)
        response = cfg.data.response_column if task.head == "lm" and lm_data.prompted(cfg.data) else None
        if response in row and not _missing(row[response]):  # a row without a response is generated, not scored
            row[response] = _checked_text(row[response], response, number, task, file)
    return rows


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _words(value):
    """A token classification row's words: a list as given, a string split on whitespace."""
    return value.split() if isinstance(value, str) else value


def _checked_text(value, column: str, number: int, task: TaskType, file):
    def bad(problem):
        return ConfigError("file", str(file), f"row {number}: {problem} in column {column!r}")

    if task.head == "token":
        words = _words(value)
        if not isinstance(words, list) or not words:
            raise bad("no words")
        if any(not isinstance(w, str) or not w for w in words):
            raise bad("an empty or non-text word")
        return value
    if _missing(value):
        raise bad("no text")
    if not isinstance(value, str):
        raise bad(f"{type(value).__name__} {value!r}, not text")
    return value


# ---------------------------------------------------------------- prediction

def encode(predictor: Predictor, rows: list[dict]) -> list[dict]:
    """The rows tokenised as the trainer tokenises them; ``labels`` marks a word's first sub-token (tagging)."""
    tokenizer, max_length = predictor.tokenizer, predictor.cfg.data.max_length
    texts = [row[predictor.columns[0]] for row in rows]
    if predictor.task.head == "token":
        texts = [_words(text) for text in texts]
        enc = tokenizer(texts, is_split_into_words=True, truncation=True, max_length=max_length)
        labels = [align_labels(enc.word_ids(i), [0] * len(words)) for i, words in enumerate(texts)]
    else:
        pairs = [row[predictor.columns[1]] for row in rows] if len(predictor.columns) > 1 else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        labels = [0] * len(rows)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(rows))]


@torch.no_grad()
def predict(predictor: Predictor, rows: list[dict]) -> list[dict]:
    """The predicted columns of each row, in order."""
    if predictor.task.head == "lm":
        return predict_lm(predictor, rows)
    loader = DataLoader(encode(predictor, rows), batch_size=int(predictor.cfg.trainer.eval_batch_size),
                        shuffle=False, collate_fn=predictor.collator)
    names, task, out = predictor.label_names, predictor.task, []
    for batch in loader:
        inputs = {k: v.to(predictor.device) for k, v in batch.items() if k != "labels"}
        with predictor.amp():
            logits = predictor.model(**inputs).logits.float().cpu()
        if task.head == "token":
            for tags, first in zip(logits.argmax(-1), batch["labels"]):
                out.append({PREDICTION: [names[i] for i in tags[first != IGNORED].tolist()]})
        elif task.name == "regression":
            out.extend({PREDICTION: value} for value in logits.squeeze(-1).tolist())
        else:
            probabilities = logits.softmax(-1).tolist()
            for best, p in zip(logits.argmax(-1).tolist(), probabilities):
                out.append({PREDICTION: names[best], **{f"{PROBABILITY}{n}": v for n, v in zip(names, p)}})
    if task.head == "token":  # words cut off by data.max_length are O, as the run's scoring counts them
        for row, predicted in zip(rows, out):
            words = _words(row[predictor.columns[0]])
            predicted[PREDICTION] += [OUTSIDE] * (len(words) - len(predicted[PREDICTION]))
    return [{**row, **predicted} for row, predicted in zip(rows, out)]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


@torch.no_grad()
def predict_lm(predictor: Predictor, rows: list[dict]) -> list[dict]:
    """A causal LM's columns: each text's (or response's) summed loss, token count and perplexity,
    encoded as lora_lab.data.lm_data encodes training examples; a prompt's generation."""
    data, tokenizer = predictor.cfg.data, predictor.tokenizer
    end_of_text, max_length = lm_data.end_of_text_id(tokenizer), int(data.max_length)
    out = [{} for _ in rows]
    if lm_data.prompted(data):
        form = lm_data.template(data)
        prompts = _token_ids(tokenizer, [form.format(prompt=row[data.prompt_column]) for row in rows])
        settings = predictor.cfg.trainer.get("generation") or {}
        continuations = generation_eval.generate(
            predictor.model, [p[:max_length] for p in prompts], end_of_text=end_of_text,
            pad_token_id=predictor.collator.pad_token_id, max_new_tokens=int(settings.get("max_new_tokens") or 64),
            batch_size=int(settings.get("batch_size") or predictor.cfg.trainer.eval_batch_size),
            device=predictor.device, amp=predictor.amp,
            decoding={"num_beams": int(settings.get("num_beams") or 1),
                      "length_penalty": float(settings.get("length_penalty", 1.0)),
                      "no_repeat_ngram_size": int(settings.get("no_repeat_ngram_size") or 0)})
        for row, text in zip(out, tokenizer.batch_decode(continuations, skip_special_tokens=True)):
            row[GENERATION] = text.strip()
        scored = [i for i, row in enumerate(rows) if isinstance(row.get(data.response_column), str)]
        responses = _token_ids(tokenizer, [rows[i][data.response_column] for i in scored])
        examples = [lm_data.encode(prompts[i], r, end_of_text, max_length) for i, r in zip(scored, responses)]
    else:
        scored = list(range(len(rows)))
        examples = [lm_data.encode([], ids, end_of_text, max_length)
                    for ids in _token_ids(tokenizer, [row[data.text_column] for row in rows])]
    loader = DataLoader(examples, batch_size=int(predictor.cfg.trainer.eval_batch_size), shuffle=False,
                        collate_fn=predictor.collator)
    nll = []
    for batch in loader:
        inputs = {k: v.to(predictor.device) for k, v in batch.items() if k != "labels"}
        with predictor.amp():
            logits = predictor.model(**inputs).logits
        nll.extend(sequence_nll(logits, batch["labels"].to(predictor.device)))
    for i, loss, example in zip(scored, nll, examples):
        tokens = lm_data.predicted_tokens(example["labels"])
        out[i].update({"nll": loss, "tokens": tokens, "perplexity": math.exp(loss / tokens) if tokens else None})
    if len(scored) < len(rows):  # the rows without a response have no scores
        for row in out:
            for name in LM_SCORES:
                row.setdefault(name, None)
    return [{**row, **predicted} for row, predicted in zip(rows, out)]


# ---------------------------------------------------------------- output

def output_path(file, out, force: bool) -> Path:
    """Where the predictions go, checked before anything is loaded."""
    file = Path(file)
    path = Path(out) if out is not None else file.with_name(f"{file.stem}.predictions.csv")
    if path.suffix.lower() not in OUT_FORMATS:
        raise ConfigError("out", str(path), f"must end in {' or '.join(OUT_FORMATS)}")
    if path.is_dir():
        raise ConfigError("out", str(path), "is a directory")
    if path.exists() and path.resolve() == file.resolve():
        raise ConfigError("out", str(path), "is the input file")
    if path.exists() and not force:
        raise ConfigError("out", str(path), "exists (--force replaces it)")
    if not path.parent.is_dir():
        raise ConfigError("out", str(path), f"is in {str(path.parent)!r}, which is not a directory")
    return path


def write_rows(path: Path, rows: list[dict]) -> None:
    """CSV (lists as JSON arrays) or JSON Lines, by the suffix; written whole, then moved into place."""
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", dir=path.parent,
                                         prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            if path.suffix.lower() == ".jsonl":
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            else:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                                     for k, v in row.items()})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)  # a temporary file is private; the output is not
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def predict_file(run_dir, file, out=None, force: bool = False, device: str = "auto") -> tuple[Path, Predictor, int]:
    """Predict every row of ``file`` with the run's model and write them; returns the output path, the
    predictor and the number of rows."""
    path = output_path(file, out, force)
    device_of(device)
    record, cfg, task = load_run(run_dir)
    rows = read_input(file, record, cfg, task)  # bad input is reported before the model loads
    predictor = load_predictor(run_dir, device)
    write_rows(path, predict(predictor, rows))
    return path, predictor, len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN", type=Path, help="a completed run directory (record.json, "
                        f"{records.STATE_FILE})")
    parser.add_argument("file", metavar="FILE", type=Path, help="the rows to predict: CSV, TSV, JSON, JSON Lines "
                        "or (token classification) CoNLL")
    parser.add_argument("--out", type=Path, help="the file to write, .csv or .jsonl (default: beside FILE, "
                        "<stem>.predictions.csv)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N "
                        "(default: auto)")
    args = parser.parse_args(argv)
    try:
        path, predictor, count = predict_file(args.run_dir, args.file, args.out, args.force, args.device)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    record = predictor.record
    print(f"[lora_lab] wrote {count:,} {predictor.task.name} prediction{'s' * (count != 1)} to {path} "
          f"({record['method']} run {args.run_dir}, epoch {predictor.epoch} of {record['last']['epoch']}, on "
          f"{predictor.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
