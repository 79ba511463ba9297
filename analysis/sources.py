"""What the subspace report analyses, read alike: lora_lab run directories, PEFT adapter folders and
Hub ids of PEFT adapters, mixed freely.

A source is tried as a local folder first: one with record.json is a run directory (ΔW and W0 derived
from its trainable state and the base model its record names, or read from the delta_w.safetensors of
a run written before schema version 3), one with adapter_config.json a PEFT adapter (``peft_adapter``; W0 only from
``base``). A name like ``user/repo`` that is no local path is a Hub id: its adapter_config.json and
adapter_model.safetensors are downloaded (nothing else), and a failed download is a one-line error.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from lora_lab.analysis.base_weights import BaseWeights
from lora_lab.analysis.peft_adapter import PeftAdapter
from lora_lab.analysis.subspace import RunDeltas
from lora_lab.errors import ConfigError, first_line
from lora_lab.methods import describe_method
from lora_lab.peft.importer import is_adapter_folder
from lora_lab.peft.names import CONFIG_FILE, WEIGHTS_FILE, align_names
from lora_lab.runtime.rebuild import open_run_deltas
from lora_lab.runtime.records import RECORD_FILE, delta_epoch, load_record

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class Source:
    """One analysed source: its label in the report, where it is, and where its ΔW comes from."""

    label: str
    location: str
    origin: str | None  # "epoch 2 (best)" for a run; how ΔW was formed for an adapter
    run: RunDeltas | None  # None: the method changed no weight matrix (ΔW = 0, e.g. BitFit)
    kind: str  # "run" or "peft"
    record: dict | None = None
    base_model: str | None = None  # the model it was trained from, as it names it
    has_w0: bool = True
    adapter: PeftAdapter | None = None

    @property
    def notes(self) -> list[str]:
        return self.adapter.notes(self.label) if self.adapter is not None else []


@dataclass
class Sources:
    items: list[Source]

    @property
    def analysed(self) -> list[Source]:
        return [s for s in self.items if s.run is not None]

    @property
    def runs(self) -> list[RunDeltas]:
        return [s.run for s in self.analysed]

    @property
    def unchanged(self) -> list[str]:
        return [s.label for s in self.items if s.run is None]

    @property
    def without_w0(self) -> list[str]:
        return [s.label for s in self.analysed if not s.has_w0]

    @property
    def notes(self) -> list[str]:
        return [n for s in self.analysed for n in s.notes]


def run_label(record: dict) -> str:
    cfg = record.get("config") or {}
    label = describe_method(cfg.get("method"), record.get("method_resolved")).label()
    if cfg.get("seed") is not None:
        label += f" seed={cfg['seed']}"
    return label


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def download_adapter(repo_id: str) -> Path:
    """The adapter's two files from the Hugging Face Hub (cached), never pickled weights."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as error:  # noqa: BLE001 - offline, unknown repository, gated, ...: all one line
        raise ConfigError("adapter", repo_id, "is not a local folder and could not be downloaded from the "
                          f"Hugging Face Hub ({type(error).__name__}: {first_line(error)})") from None


@dataclass(frozen=True)
class Location:
    folder: Path  # the local folder read
    name: str  # tells sources with one label apart: the folder's name, or the Hub id
    shown: str  # where the report says the source is: the path given, or the Hub id


def locate(source: str | Path) -> Location:
    """The local folder of a source, downloading it first when it is a Hub id."""
    text = str(source)
    path = Path(source)
    if path.is_dir():
        return Location(path, path.name, text)
    if is_hub_id(text):
        folder = download_adapter(text)
        if not is_adapter_folder(folder):
            raise ConfigError("adapter", text, f"on the Hub has no {CONFIG_FILE}; not a PEFT adapter")
        return Location(folder, text, text)
    raise ConfigError("run", text, "is not a directory (nor a Hub id user/repo)")


def _model_name(record: dict) -> str | None:
    model = (record.get("config") or {}).get("model") or {}
    return model.get("name") if isinstance(model, dict) else None


def _read_run(where: Location) -> Source:
    record = load_record(where.folder)
    delta_file = open_run_deltas(record)
    label = run_label(record)
    run = None
    if delta_file.shapes:
        r = describe_method((record.get("config") or {}).get("method"), record.get("method_resolved")).rank()
        run = RunDeltas(label, delta_file.shapes, delta_file.load, delta_file.factored, r)
    return Source(label, where.shown, delta_epoch(record), run, "run", record=record, base_model=_model_name(record))


def _read_adapter(where: Location, base: BaseWeights | None) -> Source:
    adapter = PeftAdapter(where.folder)
    if base is not None:
        adapter.attach_base(base)
    label = adapter.config.label()
    origin = f"PEFT adapter: s·B·A, s = {adapter.config.scaling_rule()}"
    if adapter.config.use_dora:
        origin += " (DoRA: direction update only)"
    return Source(label, where.shown, origin, adapter.run(label), "peft", base_model=adapter.config.base_model,
                  has_w0=adapter.has_base, adapter=adapter)


def read_source(source: str | Path, base: BaseWeights | None = None) -> tuple[Source, str]:
    """One source, checked, and the name that tells it apart from others with the same label."""
    where = locate(source)
    if (where.folder / RECORD_FILE).exists():
        return _read_run(where), where.name
    if is_adapter_folder(where.folder):
        return _read_adapter(where, base), where.name
    raise ConfigError("run", str(where.folder), f"has no {RECORD_FILE} or {CONFIG_FILE}; not a lora_lab run "
                      "directory nor a PEFT adapter folder")


def _unique_labels(labels: list[str], names: list[str]) -> list[str]:
    labels = [f"{label} ({name})" if labels.count(label) > 1 else label for label, name in zip(labels, names)]
    if len(set(labels)) < len(labels):  # same label and same name: number them
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _align(runs: list[RunDeltas]) -> list[RunDeltas]:
    """Rename other runs' modules to the first run's names where only a wrapper prefix differs."""
    if not runs:
        return runs
    aligned = [runs[0]]
    for run in runs[1:]:
        renames = align_names(runs[0].shapes, run.shapes)
        if not renames:
            aligned.append(run)
            continue
        original = {renames.get(n, n): n for n in run.shapes}
        aligned.append(RunDeltas(run.label, {n: run.shapes[o] for n, o in original.items()},
                                 lambda n, load=run.load, original=original: load(original[n]),
                                 {n: run.factored[o] for n, o in original.items()}, run.rank))
    return aligned


def load_sources(sources: Sequence[str | Path], base: str | Path | None = None) -> Sources:
    """Every source read and checked before any is analysed; labels made unique; module names of
    sources that wrap the model differently aligned to the first source's. ``base``: W0 for the PEFT
    adapters (a model folder or a .safetensors file)."""
    base_weights = BaseWeights(base) if base is not None else None
    found, names = [], []
    for source in sources:
        item, name = read_source(source, base_weights)
        found.append(item)
        names.append(name)
    for item, label in zip(found, _unique_labels([s.label for s in found], names)):
        item.label = label
        if item.run is not None:
            item.run.label = label
    analysed = [s for s in found if s.run is not None]
    for item, run in zip(analysed, _align([s.run for s in analysed])):
        item.run = run
    return Sources(found)


def check_same_base(sources: Sources, pairs: Sequence[tuple[int, int]]) -> None:
    """phi compares subspaces of one base model: refuse pairs whose sources name two different models
    (compared by their last path component, so a Hub id and a local copy of it agree)."""
    analysed = sources.analysed
    for a, b in pairs:
        name_a, name_b = analysed[a].base_model, analysed[b].base_model
        if name_a and name_b and _short(name_a) != _short(name_b):
            raise ConfigError("base_model", f"{name_a} vs {name_b}",
                              f"{analysed[a].label!r} and {analysed[b].label!r} were trained from different base "
                              "models; phi compares subspaces of one model (--allow-base-mismatch if these are "
                              "one model under two names)")


def _short(model_name: str) -> str:
    return str(model_name).rstrip("/").rsplit("/", 1)[-1].lower()
