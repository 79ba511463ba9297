import csv

import pytest
import torch
from conftest import compose_config

from lora_lab.data import loading as data_module
from lora_lab.data.loading import Collator, load_task_data
from lora_lab.errors import ConfigError
from lora_lab.models.loading import load_tokenizer


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


# ---------------------------------------------------------------- duplicates and labels

# What data.dedupe drops from each embedded data set's training rows: (repeated, conflicting labels,
# also in the source's own test split). A new embedded data set adds its counts here after measuring.
EMBEDDED_DUPLICATES = {"rotten_tomatoes": (56, 0, 0), "twenty_newsgroups": (16, 8, 7), "reuters_r8": (55, 10, 5),
                       "sms_spam": (415, 0, 0), "trec6": (71, 0, 0), "wnut16": (85, 28, 0)}


def texts(split):
    if "text_pair" in split.column_names:
        return set(zip(split["text"], split["text_pair"]))
    return {tuple(t) if isinstance(t, list) else t for t in split["text"]}  # NER rows are word lists


@pytest.mark.parametrize("name", sorted(data_module.EMBEDDED_DATASETS))
def test_embedded_splits_are_disjoint_after_dedupe(name):
    assert set(EMBEDDED_DUPLICATES) == set(data_module.EMBEDDED_DATASETS)
    cfg = compose_config(f"data={name}").data
    splits, _, counts = data_module.build_splits(cfg)
    assert (counts["repeated"], counts["conflicting"], counts["held_out"]) == EMBEDDED_DUPLICATES[name]
    assert counts["dropped"] == sum(EMBEDDED_DUPLICATES[name])
    train, validation, test = (texts(splits[s]) for s in data_module.SPLITS)
    assert len(train) == len(splits["train"])  # no repeats left inside train either
    assert not train & validation and not train & test and not validation & test
    assert sum(len(s) for s in splits.values()) == counts["rows"] - counts["dropped"] + (
        len(splits["test"]) if cfg.splits.test else 0)  # a source's own test split is not counted in rows

    if cfg.splits.test:
        return  # below: only carved splits can leak
    cfg.dedupe = False  # what the split looked like before: the same text in train and test
    splits, _, counts = data_module.build_splits(cfg)
    assert counts is None
    leaked = texts(splits["train"]) & (texts(splits["validation"]) | texts(splits["test"]))
    assert 0 < len(leaked) <= sum(EMBEDDED_DUPLICATES[name])


def test_dedupe_drops_repeats_conflicts_and_rows_of_given_evaluation_splits(tmp_path, tokenizer, capsys):
    rows = [(f"review {i}", "pos" if i % 2 else "neg") for i in range(40)]
    rows += [("review 1", "pos"), ("review 1", "pos"), ("review 2", "neg")]  # 3 repeats, same label
    rows += [("same words", "pos"), ("same words", "neg"), ("same words", "pos")]  # conflicting: all 3 go
    test_rows = [("review 3", "pos"), ("held out only", "neg"), ("another", "pos")]  # review 3 leaves train
    cfg = files_cfg(tmp_path, train=write_csv(tmp_path / "train.csv", rows),
                    test=write_csv(tmp_path / "test.csv", test_rows))
    splits, _, counts = data_module.build_splits(cfg)
    assert counts == {"rows": 46, "repeated": 3, "conflicting": 3, "held_out": 1, "dropped": 7}
    assert len(splits["test"]) == 3  # a given evaluation split is never changed
    assert sum(len(splits[s]) for s in ("train", "validation")) == 39
    assert "same words" not in texts(splits["train"]) | texts(splits["validation"])
    assert not texts(splits["train"]) & texts(splits["test"])

    load_task_data(cfg, tokenizer)
    load_task_data(cfg, tokenizer)  # from the cache: the same report
    lines = [line for line in capsys.readouterr().out.splitlines() if "data.dedupe" in line]
    assert lines == ["[lora_lab] data.dedupe: dropped 7 of 46 training rows before the split (3 repeated, "
                     "3 with conflicting labels, 1 also in a given validation or test split)"] * 2

    cfg.dedupe = False
    splits, _, counts = data_module.build_splits(cfg)
    assert counts is None and sum(len(splits[s]) for s in ("train", "validation")) == 46


def test_dedupe_compares_text_pairs(tmp_path):
    rows = [(f"premise {i % 20}", f"hypothesis {i}", i % 2) for i in range(40)]
    rows += [("premise 1", "hypothesis 1", 1)]
    path = write_csv(tmp_path / "pairs.csv", rows, header=("review", "other", "sentiment"))
    cfg = files_cfg(tmp_path, train=path)
    cfg.text_pair_column = "other"
    _, _, counts = data_module.build_splits(cfg)
    assert counts["dropped"] == counts["repeated"] == 1


def test_a_given_test_file_is_the_test_split(tmp_path):
    train = write_csv(tmp_path / "train.csv", [(f"train {i}", i % 2) for i in range(50)])
    test = write_csv(tmp_path / "test.csv", [(f"test {i}", i % 2) for i in range(7)])
    splits, _, _ = data_module.build_splits(files_cfg(tmp_path, train=train, test=test))
    assert sorted(splits["test"]["text"]) == sorted(f"test {i}" for i in range(7))
    assert len(splits["validation"]) == 5 and len(splits["train"]) == 45


def test_declared_label_names_set_the_ids(tmp_path):
    rows = [(f"r {i}", ["positive", "negative"][i % 2]) for i in range(30)]
    cfg = files_cfg(tmp_path, train=write_csv(tmp_path / "t.csv", rows))
    assert data_module.build_splits(cfg)[1] == ["negative", "positive"]  # sorted when not declared
    cfg.label_names = ["positive", "negative"]
    splits, names, _ = data_module.build_splits(cfg)
    assert names == ["positive", "negative"]
    for split in splits.values():  # "r <even>" is positive: id 0
        assert all(label == int(t.split()[1]) % 2 for t, label in zip(split["text"], split["label"]))


def test_integer_labels_stay_ids_and_others_are_remapped(tmp_path):
    ids = write_csv(tmp_path / "ids.csv", [(f"r {i}", i % 3) for i in range(30)])
    assert data_module.build_splits(files_cfg(tmp_path, train=ids))[1] == ["0", "1", "2"]
    stars = write_csv(tmp_path / "stars.csv", [(f"r {i}", 1 + i % 5) for i in range(50)])
    splits, names, _ = data_module.build_splits(files_cfg(tmp_path, train=stars))
    assert names == ["1", "2", "3", "4", "5"] and set(splits["train"]["label"]) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("rows,message", [
    ([("a", -3), ("b", 0), ("c", 1)] * 10, "label -3 is negative"),
    ([("a", 1), ("b", 0), ("c", -1)] * 10, "has the label -1 .* which marks an unlabeled row"),
    ([("a", 1.5), ("b", 0), ("c", 1)] * 10, "label 1.5 is not a class id"),
    ([("a", ""), ("b", "x"), ("c", "y")] * 10, "row 1 of the train split has no label \\(10 rows in all\\)"),
])
def test_labels_that_are_not_classes_are_errors(tmp_path, rows, message):
    cfg = files_cfg(tmp_path, train=write_csv(tmp_path / "t.csv", [(f"{t} {i}", v) for i, (t, v) in enumerate(rows)]))
    with pytest.raises(ConfigError, match=r"data.files.train=.*t.csv.: .*" + message):
        data_module.build_splits(cfg)


def test_regression_targets_must_be_numbers_and_may_be_minus_one(tmp_path):
    rows = [(f"r {i}", [-1.0, 0.5, 2.0][i % 3]) for i in range(30)]
    cfg = files_cfg(tmp_path, train=write_csv(tmp_path / "t.csv", rows))
    cfg.task_type = "regression"
    splits, names, _ = data_module.build_splits(cfg)
    assert names == ["score"] and sum(len(s) for s in splits.values()) == 30  # -1.0 is a target here
    bad = write_csv(tmp_path / "bad.csv", [(f"r {i}", ["high", "1.0"][i % 2]) for i in range(30)])
    cfg.files.train = str(bad)
    with pytest.raises(ConfigError, match="target 'high' is not a number"):
        data_module.build_splits(cfg)


def test_an_unlabeled_split_is_refused(tmp_path):
    train = write_csv(tmp_path / "train.csv", [(f"train {i}", i % 2) for i in range(30)])
    test = write_csv(tmp_path / "test.csv", [(f"test {i}", -1) for i in range(10)])
    with pytest.raises(ConfigError, match="data.files.test=.*: the test split has no labels: every label is -1"):
        data_module.build_splits(files_cfg(tmp_path, train=train, test=test))
