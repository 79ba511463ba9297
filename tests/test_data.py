import csv

import pytest
import torch

from conftest import compose_config
from lora_lab import data as data_module
from lora_lab.data import Collator, load_task_data
from lora_lab.errors import ConfigError
from lora_lab.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose_config().model)


def write_csv(path, rows, header=("review", "sentiment")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def files_cfg(tmp_path, **files):
    overrides = ["data=files", f"data.cache_dir={tmp_path / 'cache'}", "data.text_column=review",
                 "data.label_column=sentiment"]
    overrides += [f"data.files.{k}={v}" for k, v in files.items()]
    return compose_config(*overrides).data


def test_local_csv_with_string_labels(tmp_path, tokenizer):
    rows = [(f"review number {i} {'good' if i % 3 else 'bad'}", "pos" if i % 3 else "neg") for i in range(60)]
    cfg = files_cfg(tmp_path, train=write_csv(tmp_path / "train.csv", rows))
    data = load_task_data(cfg, tokenizer)
    assert data.label_names == ["neg", "pos"]
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 48, "validation": 6, "test": 6}
    labels = set(data.splits["train"]["labels"])
    assert labels == {0, 1}


def test_split_is_deterministic_and_cached(tmp_path, tokenizer, monkeypatch):
    rows = [(f"text {i}", i % 2) for i in range(50)]
    cfg = files_cfg(tmp_path, train=write_csv(tmp_path / "t.csv", rows))
    first = load_task_data(cfg, tokenizer)
    monkeypatch.setattr(data_module, "_load_raw", lambda cfg: (_ for _ in ()).throw(AssertionError("not cached")))
    second = load_task_data(cfg, tokenizer)
    assert first.splits["test"]["input_ids"] == second.splits["test"]["input_ids"]


def test_missing_file(tmp_path, tokenizer):
    cfg = files_cfg(tmp_path, train=tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match=r"data.files.train='.*nope.csv': does not exist"):
        load_task_data(cfg, tokenizer)


def test_missing_column(tmp_path, tokenizer):
    path = write_csv(tmp_path / "t.csv", [("a", 1)] * 20, header=("body", "sentiment"))
    cfg = files_cfg(tmp_path, train=path)
    with pytest.raises(ConfigError, match=r"data.text_column='review': is not a column .*\['body', 'sentiment'\]"):
        load_task_data(cfg, tokenizer)


def test_empty_split(tmp_path, tokenizer):
    train = write_csv(tmp_path / "train.csv", [(f"t {i}", i % 2) for i in range(20)])
    test = write_csv(tmp_path / "test.csv", [])
    cfg = files_cfg(tmp_path, train=train, test=test)
    cfg.splits.test = "test"
    with pytest.raises(ConfigError, match=r"data.files.test=.*test.csv.: (has no rows|could not be read)"):
        load_task_data(cfg, tokenizer)


def test_embedded_rotten_tomatoes(tmp_path, tokenizer):
    cfg = compose_config(f"data.cache_dir={tmp_path}", "data.max_train=100", "data.max_eval=50").data
    data = load_task_data(cfg, tokenizer)
    assert data.label_names == ["rotten", "fresh"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 100, "validation": 50, "test": 50}


def test_collator_pads_per_batch():
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 0},
            {"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 1}]
    batch = Collator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].dtype == torch.long
    fixed = Collator(pad_token_id=0, padding="max_length", max_length=6)(rows)
    assert fixed["input_ids"].shape == (2, 6)
    with pytest.raises(ConfigError, match="data.padding='longest'"):
        Collator(0, padding="longest")
