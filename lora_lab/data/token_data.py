"""Token classification data (NER): each example is a list of words with one tag per word.

Tags follow the BIO scheme (``O``, ``B-<type>``, ``I-<type>``; IOBES's ``E-``/``S-`` also work) so that
entities can be scored as spans. Words are split into sub-tokens by the model's tokenizer; the first
sub-token of a word carries the word's tag and every other position (further sub-tokens, special
tokens, padding) carries -100, which the loss and the metrics ignore. Each example also keeps the tags
of all its words (``word_labels``), so words cut off by ``data.max_length`` are still scored (as O).
"""
from __future__ import annotations

import re

import datasets

from lora_lab.data.columns import column_values
from lora_lab.errors import ConfigError
from lora_lab.tasks.losses import IGNORED

TAG = re.compile(r"^(O|[BIES]-\S.*)$")


def check_rows(chosen: dict, cfg, source_key) -> None:
    """Every row has a non-empty list of words and as many tags."""

    for split, ds in chosen.items():
        words, tags = column_values(ds, "text"), column_values(ds, "label")
        for i, (w, t) in enumerate(zip(words, tags)):
            if not isinstance(w, (list, tuple)) or not w:
                raise ConfigError(*source_key(cfg, split, "text_column"), f"row {i + 1} of the {split} split has no "
                                  "words (token classification needs a list of words per row)")
            if any(not isinstance(x, str) or not x for x in w):
                raise ConfigError(*source_key(cfg, split, "text_column"), f"row {i + 1} of the {split} split has an "
                                  "empty or non-text word")
            if not isinstance(t, (list, tuple)) or len(t) != len(w):
                n = len(t) if isinstance(t, (list, tuple)) else "no"
                raise ConfigError(*source_key(cfg, split), f"row {i + 1} of the {split} split has {len(w)} words "
                                  f"and {n} tags; every word needs one tag")


def _check_scheme(names: list[str], key: str, value) -> None:
    bad = [n for n in names if not TAG.match(n)]
    if bad:
        raise ConfigError(key, value, f"tag {bad[0]!r} is not in BIO form (O, B-<type>, I-<type>); entity "
                          "metrics need it")
    if "O" not in names:
        raise ConfigError(key, value, "has no 'O' tag (the tag of words outside every entity)")


def tag_names(values: set[str]) -> list[str]:
    """The tags in a stable order: O first, then by entity type, B before I (before E, S)."""
    order = {"B": 0, "I": 1, "E": 2, "S": 3}
    rest = sorted((v for v in values if v != "O"), key=lambda t: (t[2:], order.get(t[0], 9), t))
    return ["O", *rest]


def encode_tags(chosen: dict, source_names, cfg, source_key):
    """Tags to ids. Names: ``data.label_names`` if set, else the source's (an embedded set's, a
    ClassLabel sequence's), else the distinct tags (O first). A tag outside the names is an error."""

    chosen = datasets.DatasetDict(chosen)
    declared = [str(n) for n in cfg.get("label_names") or []] or None
    inner = getattr(chosen["train"].features["label"], "feature", None)
    if hasattr(inner, "names"):  # a sequence of ClassLabel: already ids
        names = declared or list(inner.names)
        if len(names) != len(inner.names):
            raise ConfigError("data.label_names", declared, f"names {len(declared)} tags, the data has "
                              f"{len(inner.names)}: {list(inner.names)}")
        _check_scheme(names, "data.label_names" if declared else "data.label_column",
                      declared or cfg.get("label_column"))
        return chosen, names
    rows = {split: column_values(ds, "label") for split, ds in chosen.items()}
    numeric = all(isinstance(t, int) and not isinstance(t, bool) for tags in rows.values() for s in tags for t in s)
    names = declared or (None if numeric else source_names)
    if numeric:
        if not names:
            raise ConfigError("data.label_names", None, "must name the tags when the data holds tag ids (e.g. "
                              "[O, B-PER, I-PER]); entity metrics need the names")
        lookup = {i: i for i in range(len(names))}
    else:
        names = names or tag_names({str(t) for tags in rows.values() for s in tags for t in s})
        lookup = {name: i for i, name in enumerate(names)}
    key = ("data.label_names", declared) if declared else None
    _check_scheme(names, *(key or ("data.label_column", cfg.get("label_column"))))
    for split, tags in rows.items():
        for i, sentence in enumerate(tags):
            for t in sentence:
                if t not in lookup:
                    where = key or source_key(cfg, split)
                    raise ConfigError(*where, f"row {i + 1} of the {split} split: tag {t!r} is not one of "
                                      f"the {len(names)} tags {names}")
    encoded = chosen.map(lambda b: {"tag_ids": [[lookup[t] for t in s] for s in b["label"]]}, batched=True,
                         remove_columns=["label"])
    encoded = encoded.rename_column("tag_ids", "label").cast_column("label", datasets.Sequence(datasets.Value("int64")))
    return encoded, list(names)


def align_labels(word_ids: list, word_labels: list[int]) -> list[int]:
    """One label per sub-token position: the word's label on its first sub-token, -100 elsewhere."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORED if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def tokenise(dsets, tokenizer, max_length: int, key: str | None = None):
    """``key``: a name of the result (the data cache's key); without one datasets fingerprints the
    transform itself."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model.name", getattr(tokenizer, "name_or_path", None), "token classification needs a "
                          "fast tokenizer (one with word ids), this one is not")

    def encode(batch):
        enc = tokenizer(batch["text"], is_split_into_words=True, truncation=True, max_length=max_length)
        enc["labels"] = [align_labels(enc.word_ids(i), tags) for i, tags in enumerate(batch["label"])]
        enc["word_labels"] = batch["label"]
        return enc

    columns = dsets["train"].column_names
    return datasets.DatasetDict({split: ds.map(encode, batched=True, remove_columns=columns, desc="tokenising",
                                               new_fingerprint=f"{key}-{split}" if key else None)
                                 for split, ds in dsets.items()})
