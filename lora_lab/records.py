"""Run records: what a finished run leaves in its output directory, written atomically.

    <run_dir>/record.json            config, per-epoch metrics, best/last, measurements, versions, status
    <run_dir>/trainable.safetensors  the trained parameters (method parameters and head)
    <run_dir>/delta_w.safetensors    ΔW per adapted matrix: "<module>::dense" or "<module>::B" and
                                     "<module>::A" (ΔW = B @ A, scaling folded into B), and
                                     "<module>::base" (W0); metadata "kinds" maps module -> kind

Every file is written to a temporary name and renamed, so a reader never sees half a file; readers
trust a record only when its status is "completed".
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_lab.errors import ConfigError
from lora_lab.methods.base import DeltaW

RECORD_FILE = "record.json"
STATE_FILE = "trainable.safetensors"
DELTA_FILE = "delta_w.safetensors"
LAST_STATE_FILE = "trainable_last.safetensors"  # the last epoch's state, when it is not the best epoch's
SCHEMA_VERSION = 2  # 1: no "schema_version" key, state and ΔW of the last epoch; 2: of the best epoch, "files"
_PARTS = ("dense", "B", "A", "base")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_delta_weights(path: Path, deltas: dict[str, DeltaW]) -> None:
    tensors, kinds = {}, {}
    for name, d in deltas.items():
        kinds[name] = d.kind
        for part in _PARTS:
            t = getattr(d, part)
            if t is not None:
                tensors[f"{name}::{part}"] = t.float()
    save_tensors(path, tensors, metadata={"kinds": json.dumps(kinds)})


def delta_shapes(deltas: dict[str, DeltaW]) -> dict[str, list[int]]:
    """The shape of each adapted matrix, as the record states it (readers check ΔW files against it)."""
    return {name: list(d.base.shape if d.base is not None else d.shape) for name, d in deltas.items()}


def load_delta_weights(path: Path) -> dict[str, DeltaW]:
    path = Path(path)
    if not path.exists():
        raise ConfigError("run", str(path.parent), f"has no {DELTA_FILE} (no ΔW was saved for this run)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        kinds = json.loads((f.metadata() or {}).get("kinds", "{}"))
    flat = load_file(str(path))
    out: dict[str, DeltaW] = {}
    for key, tensor in flat.items():
        name, _, part = key.rpartition("::")
        d = out.setdefault(name, DeltaW(kind=kinds.get(name, "weight_difference")))
        setattr(d, part, tensor)
    return out


def load_record(run_dir: Path, require_completed: bool = True) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / RECORD_FILE
    if not path.exists():
        raise ConfigError("run", str(run_dir), f"has no {RECORD_FILE}; not a lora_lab run directory")
    with open(path) as f:
        record = json.load(f)
    if require_completed and record.get("status") != "completed":
        raise ConfigError("run", str(run_dir), f"did not complete (status {record.get('status')!r})")
    record["run_dir"] = str(run_dir)
    return record


def find_run_dirs(*roots: Path) -> list[Path]:
    """Every directory under the given roots (inclusive) that holds a record.json, sorted."""
    found = set()
    for root in roots:
        root = Path(root)
        if (root / RECORD_FILE).exists():
            found.add(root)
        found.update(p.parent for p in root.rglob(RECORD_FILE))
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    """Job directories in job order: 2_lora before 10_lora."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]
