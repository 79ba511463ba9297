"""A run's trained model rebuilt from its record and trainable state, and the ΔW derived from it.

A run of schema version 3 stores no ΔW and no W0: the base model is loaded again from what the record
names (the model's name or path; a random model from its seed), the method applied, the trainable
state loaded, and the method's ``delta_weights`` asked, as at the end of the run. The record's SHA-256
of each adapted W0 ("base_sha256") must match the rebuilt base, so a run is never analysed against
another model than the one it was trained from. Older runs read their delta_w.safetensors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from lora_lab.errors import ConfigError, first_line
from lora_lab.methods.base import DeltaW
from lora_lab.runtime import records


@dataclass
class Rebuilt:
    record: dict
    method: object  # the run's Method, applied to ``model``
    model: nn.Module  # the trained model, in eval mode, on the CPU
    base: nn.Module | None  # the same model before the method was applied, when asked for


def rebuild_trained(run_dir, record: dict | None = None, keep_base: bool = False, initial: bool = False) -> Rebuilt:
    """The trained model of a completed run, on the CPU (and, with ``keep_base``, its base model). With
    ``initial``, the model as the method initialised it, before the first step: the trainer's seed and
    order give the same random numbers (LoRA's A, a fresh head), so analyses can compare what training
    learned with where it started."""
    from lora_lab.methods import build_method
    from lora_lab.models.loading import load_model
    from lora_lab.runtime.seeding import set_seed
    from lora_lab.tasks.task_types import task_type

    run_dir = Path(run_dir)
    if record is None:
        if not run_dir.is_dir():
            raise ConfigError("run", str(run_dir), "is not a directory")
        record = records.load_record(run_dir)
    state_path = run_dir / records.STATE_FILE
    if not state_path.is_file():
        raise ConfigError("run", str(run_dir), f"has no {records.STATE_FILE}; the run is incomplete")
    records.verify_run_file(record, records.STATE_FILE)  # the SHA-256 its record lists
    try:
        state = records.load_file(str(state_path))
    except Exception as error:  # noqa: BLE001 - safetensors reports a bad file in several types
        raise ConfigError("run", str(run_dir), f"{records.STATE_FILE} could not be read: {first_line(error)}") from None
    cfg = OmegaConf.create(record["config"])
    if initial and cfg.method.get("init_from"):
        raise ConfigError("run", str(run_dir), f"started from method.init_from={cfg.method.init_from}, not from "
                          "its own initialisation; rebuild that run's initial state instead")
    cfg.method.init_from = None  # the trained state replaces whatever the run started from
    method = build_method(cfg.method)
    resolved = record.get("method_resolved") or {}
    method.total_steps = resolved.get("total_step") or (record.get("last") or {}).get("step")
    labels = (record.get("task") or {}).get("label_names") or []
    set_seed(int(cfg.seed))  # as the trainer does just before loading: same random model, same fresh head
    model = load_model(cfg.model, len(labels), labels, task=task_type(cfg.data).head).eval()
    base = copy.deepcopy(model) if keep_base else None
    method.apply(model)
    method.finish_training(model)  # the form the trainer saved the state in
    if initial:
        return Rebuilt(record, method, model.eval(), base)
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    if set(state) != trained:
        odd = sorted(set(state) ^ trained)[0]
        raise ConfigError("run", str(run_dir), f"{records.STATE_FILE} does not match the rebuilt model (e.g. "
                          f"{odd}); was it written by another lora_lab version?")
    with torch.no_grad():
        for n, tensor in state.items():
            if tensor.shape != params[n].shape:
                raise ConfigError("run", str(run_dir), f"{records.STATE_FILE} holds {n} of shape "
                                  f"{tuple(tensor.shape)}, the rebuilt model needs {tuple(params[n].shape)}")
            params[n].data = tensor.to(params[n].device)  # as saved: fp32 also on a bf16 base (model.dtype)
    return Rebuilt(record, method, model.eval(), base)


class DerivedDeltaWeights:
    """The ΔW of a version 3 run, read like a ``records.DeltaWeightsFile`` (``shapes``, ``factored``,
    ``kinds``, ``load``, ``load_all``). The model is rebuilt, ΔW derived and W0 checked against the
    record's fingerprints when it is opened; a run whose method changed no matrix rebuilds nothing."""

    def __init__(self, record: dict):
        self.run_dir = Path(record["run_dir"])
        self.shapes = {name: tuple(shape) for name, shape in record["delta_w_shapes"].items()}
        self.kinds: dict[str, str] = {}
        self.factored: dict[str, bool] = {}
        self._deltas: dict[str, DeltaW] = {}
        if self.shapes:
            self._derive(record)

    def _refuse(self, problem: str) -> ConfigError:
        return ConfigError("run", str(self.run_dir), problem)

    def _derive(self, record: dict) -> None:
        rebuilt = rebuild_trained(self.run_dir, record)
        with torch.no_grad():
            deltas = rebuilt.method.delta_weights(rebuilt.model)
        if set(deltas) != set(self.shapes):
            odd = sorted(set(deltas) ^ set(self.shapes))[0]
            raise self._refuse(f"rebuilt gives ΔW of other modules than its {records.RECORD_FILE} lists (e.g. {odd}); "
                               "was it written by another lora_lab version?")
        fingerprints = record["base_sha256"]
        model = (record.get("config") or {}).get("model") or {}
        for name in sorted(deltas):
            d = deltas[name]
            if d.shape != self.shapes[name] or records.weight_sha256(d.base) != fingerprints[name]:
                raise self._refuse(f"was trained from another base than model {model.get('name')!r} gives now: "
                                   f"W0 of {name} differs from the SHA-256 its {records.RECORD_FILE} holds")
        for name, d in deltas.items():
            self._deltas[name] = DeltaW(**{part: None if getattr(d, part) is None else getattr(d, part).float()
                                           for part in ("dense", "B", "A", "base")}, kind=d.kind)
            self.kinds[name], self.factored[name] = d.kind, d.dense is None

    def load(self, name: str) -> DeltaW:
        return self._deltas[name]

    def load_all(self) -> dict[str, DeltaW]:
        return dict(self._deltas)


def open_run_deltas(record: dict):
    """The ΔW of a run whose record ``load_record`` returned: derived (version 3) or read from its
    delta_w.safetensors (``records.open_delta_weights``, versions 1 and 2)."""
    if records.record_version(record) < 3:
        return records.open_delta_weights(record)
    if "delta_w_shapes" not in record:
        raise ConfigError("run", str(record["run_dir"]), "kept no ΔW information (record.save_delta_w=false)")
    return DerivedDeltaWeights(record)


def load_run_deltas(run_dir) -> dict[str, DeltaW]:
    """Every module's ΔW of the completed run in ``run_dir``, whatever its schema version."""
    return open_run_deltas(records.load_record(Path(run_dir))).load_all()
