"""Causal language modelling data (``data.task_type=causal_lm``): each example is a text the model
learns to continue, token by token.

Two shapes of data:

    plain text        data.text_column                           the loss covers every token
    prompt/response   data.prompt_column + data.response_column  the loss covers the response only

An example is tokenised without the tokenizer's special tokens (no [CLS], no BOS) as the prompt
formatted with ``data.prompt_template`` (``{prompt}`` is the prompt's text), then the response (or the
plain text), then one end-of-text token (the tokenizer's EOS, else its SEP), and cut to
``data.max_length``. Prompt and response are tokenised separately and joined, so the boundary between
them is exact. ``labels`` are the input ids with -100 (ignored by the loss) on the prompt's positions;
the collator pads labels with -100 too. The model shifts them itself: position i predicts label i + 1,
so an example predicts the labelled tokens after its first position (``predicted_tokens``).

``data.packing=true`` concatenates the tokenised training examples, end-of-text tokens included, and
cuts the stream into blocks of ``data.max_length`` tokens (the last block may be shorter), labels
carried along: no padding is trained on, and attention spans the examples of a block. Validation and
test are never packed, so their metrics stay per example. A training example (or block) left with no
token to predict is dropped: a batch made of such examples has no loss.

Evaluation splits of prompt/response data also keep what generation needs (lora_lab.tasks.generation_eval):
the prompt's text, its token count and the reference response as the tokenizer writes it back.
"""
from __future__ import annotations

import math
import string

import datasets

from lora_lab.data.columns import column_values
from lora_lab.errors import ConfigError
from lora_lab.tasks.losses import IGNORED

DEFAULT_TEMPLATE = "{prompt}\n"  # the response starts on the line after the prompt


def prompted(cfg) -> bool:
    """Prompt/response data (else plain text)."""
    return bool(cfg.get("prompt_column"))


def check_template(template) -> None:
    """``data.prompt_template`` is a format string whose only field is ``{prompt}``."""
    if not isinstance(template, str):
        raise ConfigError("data.prompt_template", template, "must be a string with {prompt} in it")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ConfigError("data.prompt_template", template, f"is not a format string: {error} (write a literal "
                          "brace as {{ or }})") from None
    if fields != ["prompt"]:
        raise ConfigError("data.prompt_template", template, f"must hold the field {{prompt}} once and no other "
                          f"(it has {fields})")


def template(cfg) -> str:
    return cfg.get("prompt_template") or DEFAULT_TEMPLATE


def columns(cfg) -> dict[str, tuple[str, str]]:
    """The source's columns this task reads: source column -> (normalised name, the key naming it)."""
    if prompted(cfg):
        return {cfg.prompt_column: ("prompt", "data.prompt_column"),
                cfg.response_column: ("response", "data.response_column")}
    return {cfg.text_column: ("text", "data.text_column")}


def end_of_text_id(tokenizer) -> int:
    """The token that ends every example: the tokenizer's EOS, else its SEP (BERT-style vocabularies)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("model.tokenizer", getattr(tokenizer, "name_or_path", None), "has neither an EOS nor a SEP "
                      "token to end each example with (data.task_type=causal_lm)")


def check_rows(chosen: dict, cfg, source_key) -> None:
    """Every row has its text (plain) or its prompt and response, as strings."""

    for split, ds in chosen.items():
        for column, (name, key) in columns(cfg).items():
            for i, value in enumerate(column_values(ds, name)):
                if not isinstance(value, str):
                    what = "no text" if value is None or (isinstance(value, float) and math.isnan(value)) \
                        else f"a {type(value).__name__}, not text,"
                    raise ConfigError(*source_key(cfg, split, key.split(".", 1)[1]), f"row {i + 1} of the {split} "
                                      f"split has {what} in column {column!r}")


def predicted_tokens(labels: list[int]) -> int:
    """How many tokens an example's loss covers: its labelled positions after the first (the model
    predicts position i + 1 from positions up to i)."""
    return sum(1 for label in labels[1:] if label != IGNORED)


def encode(prompt_ids: list[int], response_ids: list[int], end_of_text: int, max_length: int) -> dict:
    """One example: input ids, attention mask, labels (-100 on the prompt), cut to ``max_length``."""
    ids = (list(prompt_ids) + list(response_ids) + [end_of_text])[:max_length]
    labels = ([IGNORED] * len(prompt_ids) + list(response_ids) + [end_of_text])[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def pack(ds, max_length: int):
    """The examples of ``ds`` joined end to end and cut into blocks of ``max_length`` tokens (the last
    may be shorter); each block's labels are the joined labels at its positions."""
    def blocks(batch):
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        starts = range(0, len(ids), max_length)
        return {"input_ids": [ids[s: s + max_length] for s in starts],
                "attention_mask": [[1] * len(ids[s: s + max_length]) for s in starts],
                "labels": [labels[s: s + max_length] for s in starts]}

    # one batch: the whole split is one stream, so only its very last block is short
    return ds.map(blocks, batched=True, batch_size=None, remove_columns=ds.column_names, desc="packing")


def tokenise(dsets, tokenizer, cfg, key: str | None = None):
    """The tokenised splits (see the module's docstring); ``key`` names the result (the data cache's
    key), else datasets fingerprints the transform itself."""
    end_of_text = end_of_text_id(tokenizer)
    max_length = int(cfg.max_length)
    has_prompt = prompted(cfg)
    form = template(cfg)

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode_batch(batch, evaluation: bool):
        if has_prompt:
            prompts = ids([form.format(prompt=p) for p in batch["prompt"]])
            responses = ids(batch["response"])
        else:
            responses = ids(batch["text"])
            prompts = [[] for _ in responses]
        rows = [encode(p, r, end_of_text, max_length) for p, r in zip(prompts, responses)]
        out = {key: [row[key] for row in rows] for key in ("input_ids", "attention_mask", "labels")}
        if evaluation and has_prompt:
            out["prompt"] = batch["prompt"]
            out["prompt_length"] = [min(len(p), max_length) for p in prompts]
            out["reference"] = tokenizer.batch_decode(responses, skip_special_tokens=True)
        return out

    out = {}
    for split, ds in dsets.items():
        evaluation = split != "train"
        tokenised = ds.map(lambda b: encode_batch(b, evaluation), batched=True, remove_columns=ds.column_names,
                           desc="tokenising", new_fingerprint=f"{key}-{split}" if key else None)
        if not evaluation:
            if cfg.get("packing"):
                tokenised = pack(tokenised, max_length)
            before = len(tokenised)
            tokenised = tokenised.filter(lambda b: [predicted_tokens(labels) > 0 for labels in b["labels"]],
                                         batched=True, desc="dropping examples with nothing to predict")
            if len(tokenised) < before:
                print(f"[lora_lab] data.task_type=causal_lm: dropped {before - len(tokenised):,} of {before:,} "
                      f"training examples with no token to predict (e.g. a prompt that fills "
                      f"data.max_length={max_length})")
        out[split] = tokenised
    return datasets.DatasetDict(out)
