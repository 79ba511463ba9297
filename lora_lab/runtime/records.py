"""Run records: what a run leaves in its output directory, written atomically.

    <run_dir>/record.json                 config, per-epoch metrics, best/last, measurements, versions, status
    <run_dir>/trainable.safetensors       the trained parameters (method parameters and head)
    <run_dir>/trainable_last.safetensors  the last epoch's parameters, with trainer.keep_last=true and a
                                          last epoch that is not the best
    <run_dir>/delta_w.safetensors         (versions 1 and 2 only) ΔW per adapted matrix: "<module>::dense" or
                                          "<module>::B" and "<module>::A" (ΔW = B @ A, scaling folded into
                                          B), and "<module>::base" (W0); metadata "kinds" maps module -> kind
    <run_dir>/predictions.safetensors     per-example results on test at the best epoch, a few bytes per
                                          example (lora_lab.runtime.predictions); tables resample them

Schema versions of record.json ("schema_version"; a record without the key is version 1):

    1  trainable.safetensors and delta_w.safetensors hold the last epoch
    2  they hold the best epoch; "files" maps each file to {"epoch": N, "holds": "best" | "last"};
       "delta_w_shapes" maps each adapted module to [out, in] when ΔW was saved
    3  no ΔW file: ΔW is derived from trainable.safetensors and the base model the config names
       (lora_lab.runtime.rebuild); "delta_w" says how ("derived: ..." or "none: ..."), "base_sha256"
       maps each adapted module to the SHA-256 of its W0 (fp32), so that another base is refused

"status" is completed, failed, diverged, preempted or interrupted; a version 2 record of a run that
did not complete has "error" (one line), "error_kind" and "config".

Every file is written to a temporary name and renamed, so a reader never sees half a file. Readers
check what they load (``read_record``, ``DeltaWeightsFile``) and refuse, with a ConfigError naming the
file, a record that is not a JSON object, of an unknown schema version, or completed without the keys
the tools read, and a ΔW file that safetensors cannot parse or whose tensors disagree with each other
or with the record; they trust a record's results only when its status is "completed".
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file  # noqa: F401 - load_file is read through records

from lora_lab.errors import ConfigError, first_line
from lora_lab.methods.base import DeltaW
from lora_lab.rules import is_integer, is_number
from lora_lab.tensor_files import UnreadableTensors, read_header, read_tensors

RECORD_FILE = "record.json"
STATE_FILE = "trainable.safetensors"
DELTA_FILE = "delta_w.safetensors"
LAST_STATE_FILE = "trainable_last.safetensors"  # the last epoch's state, when it is not the best epoch's
PREDICTIONS_FILE = "predictions.safetensors"  # per-example test results of the best epoch (runtime.predictions)
# 1: no "schema_version" key, state and ΔW of the last epoch; 2: of the best epoch, "files"; 3: ΔW derived, not stored
SCHEMA_VERSION = 3
_PARTS = ("dense", "B", "A", "base")
SCHEMA_VERSIONS = (1, 2, 3)  # what the readers accept; anything else is refused
STATUSES = ("completed", "failed", "diverged", "preempted", "interrupted")
ERROR_KINDS = ("config", "out_of_memory", "disk", "diverged", "preempted", "interrupted", "exception")
# The keys the analysis tools read, per schema version: a completed record without one is refused.
COMPLETED_KEYS = {1: ("config", "best", "last", "parameters", "measurements"),
                  2: ("config", "best", "last", "parameters", "measurements", "files"),
                  3: ("config", "best", "last", "parameters", "measurements", "files")}
# records of runs that did not complete
STOPPED_KEYS = {1: (), 2: ("error", "error_kind", "config"), 3: ("error", "error_kind", "config")}
HOLDS = ("best", "last")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
DATA_SHA256_KEY = "data_sha256"  # a sealed file's header: the SHA-256 of its tensor data (save_tensors)
_PLACEHOLDER = f'"{DATA_SHA256_KEY}":"{"0" * 64}"'.encode()
_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a directory
        pass
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # the bytes reach the disk before the name does: a crash leaves old or new, never half
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; records are meant to be shared
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def not_measured(key: str, reason: str) -> dict:
    """A measurement that could not be taken: ``null`` with the reason beside it (``<key>_reason``)."""
    return {key: None, f"{key}_reason": reason}


def non_finite_to_null(obj, path: str = "") -> tuple[object, dict[str, str]]:
    """``obj`` with every NaN or infinite float replaced by None (strict JSON has neither), and what was
    replaced: {"<path>": "nan" | "inf" | "-inf"}, paths like ``epochs[0].train_loss``."""
    found: dict[str, str] = {}

    def clean(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            found[where] = repr(value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    return clean(obj, path), found


def write_json(path: Path, obj) -> None:
    """``obj`` as strict JSON, atomically: a NaN or infinity raises ValueError (``allow_nan=False``), so
    a value that could not be measured must be written as null with its reason (``not_measured``,
    ``non_finite_to_null``). Readers still accept NaN in records written before."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=False)  # fails before any write

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_sha256(f) -> tuple[int, bytes, str]:
    """Of an open safetensors file: its header's length, the header, and the SHA-256 of the tensor
    data after it."""
    f.seek(0)
    size = int.from_bytes(f.read(8), "little")
    header = f.read(size)
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        digest.update(chunk)
    return size, header, digest.hexdigest()


def _seal(tmp) -> None:
    """Write the SHA-256 of a safetensors file's tensor data into its header, in the place
    ``DATA_SHA256_KEY`` keeps for it (the header keeps its length: the placeholder is as long)."""
    with open(tmp, "r+b") as f:
        _, header, digest = _data_sha256(f)
        at = header.index(_PLACEHOLDER)
        f.seek(8 + at + len(_PLACEHOLDER) - 65)  # the 64 zeros before the closing quote
        f.write(digest.encode())
        f.flush()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 seal: bool = False) -> str:
    """Write a safetensors file atomically; returns its SHA-256 (what a record's ``files`` lists).
    ``seal``: also keep the SHA-256 of its tensor data in its own header (``DATA_SHA256_KEY``), for
    files no record lists (checkpoints); ``check_sealed`` verifies it."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if seal:
        metadata = {**(metadata or {}), DATA_SHA256_KEY: "0" * 64}
    digest = {}

    def write(tmp):
        save_file(tensors, tmp, metadata=metadata)
        if seal:
            _seal(tmp)
        digest["sha256"] = file_sha256(tmp)

    _atomic(path, write)
    return digest["sha256"]


def check_sealed(path: Path, metadata: dict[str, str], what: str = "file") -> None:
    """Refuse (ConfigError naming the file) a sealed safetensors file whose tensor data no longer has
    the SHA-256 its header keeps; a file without one (written before) passes."""
    want = metadata.get(DATA_SHA256_KEY)
    if want is None:
        return
    with open(path, "rb") as f:
        got = _data_sha256(f)[2]
    if got != want:
        raise ConfigError(what, str(path), f"has tensor data of SHA-256 {got[:16]}..., not the {want[:16]}... "
                          "its header keeps; the file is corrupt")


def check_digest(path: Path, want: str | None, listed_in: str) -> None:
    """Refuse (ConfigError naming the file) a file whose SHA-256 is not ``want``, the digest that
    ``listed_in`` (e.g. its record.json) lists for it; None (written before digests) passes."""
    if want is None:
        return
    try:
        got = file_sha256(path)
    except OSError as error:
        raise ConfigError("file", str(path), f"cannot be read ({first_line(error)})") from None
    if got != want:
        raise ConfigError("file", str(path), f"has SHA-256 {got[:16]}..., not the {want[:16]}... {listed_in} lists; "
                          "the file is corrupt or was changed after it was written")


def verify_run_file(record: dict, name: str) -> None:
    """Refuse a file of a run directory (``record["run_dir"]``) whose SHA-256 differs from the one its
    record's ``files`` lists; a record without digests (written before) passes."""
    entry = (record.get("files") or {}).get(name)
    want = entry.get("sha256") if isinstance(entry, dict) else None
    check_digest(Path(record["run_dir"]) / name, want, f"its {RECORD_FILE}")


def save_delta_weights(path: Path, deltas: dict[str, DeltaW]) -> str:
    tensors, kinds = {}, {}
    for name, d in deltas.items():
        kinds[name] = d.kind
        for part in _PARTS:
            t = getattr(d, part)
            if t is not None:
                tensors[f"{name}::{part}"] = t.float()
    return save_tensors(path, tensors, metadata={"kinds": json.dumps(kinds)})


def base_fingerprints(deltas: dict[str, DeltaW]) -> dict[str, str]:
    """The SHA-256 of each adapted matrix's W0 as fp32 bytes: what a version 3 record keeps of the base."""
    return {name: weight_sha256(d.base) for name, d in deltas.items()}


def weight_sha256(weight: torch.Tensor) -> str:
    """The SHA-256 of a matrix's values as contiguous fp32 bytes (whatever its dtype and device)."""
    data = weight.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def delta_shapes(deltas: dict[str, DeltaW]) -> dict[str, list[int]]:
    """The shape of each adapted matrix, as the record states it (readers check ΔW files against it)."""
    return {name: list(d.base.shape if d.base is not None else d.shape) for name, d in deltas.items()}


# ---------------------------------------------------------------- reading: every file is checked

def record_version(record: dict) -> int:
    """The schema version of a record: its "schema_version", 1 for records written before the key."""
    return record.get("schema_version", 1)


def check_record(record, path: Path) -> int:
    """Refuse (ConfigError naming ``path``) a record the tools cannot trust; returns its schema version.

    Every record: a JSON object of a known schema version and status. Completed records: the keys
    ``COMPLETED_KEYS`` of their version, of the right types; version 2 also ``files`` consistent with
    ``best`` and ``last``, and ``delta_w_shapes`` when ΔW was saved. Other statuses, version 2:
    ``error``, ``error_kind`` and ``config``.
    """
    def refuse(problem: str) -> ConfigError:
        return ConfigError("record", str(path), problem)

    if not isinstance(record, dict):
        raise refuse(f"holds a JSON {type(record).__name__}, not an object; the file is corrupt")
    version = record_version(record)
    if not is_integer(version) or version not in SCHEMA_VERSIONS:
        raise refuse(f"has schema_version {version!r}; this lora_lab reads versions "
                     f"{', '.join(map(str, SCHEMA_VERSIONS))} (was it written by a newer lora_lab?)")
    status = record.get("status")
    if status not in STATUSES:
        raise refuse(f"has status {status!r}; expected one of {', '.join(STATUSES)}")
    required = COMPLETED_KEYS[version] if status == "completed" else STOPPED_KEYS[version]
    missing = [key for key in required if key not in record]
    if missing:
        raise refuse(f"lacks {', '.join(missing)}, which every {status} record of schema version {version} "
                     "has; the file is incomplete")
    if "config" in record:
        config = record["config"]
        if not isinstance(config, dict):
            raise refuse("has a 'config' that is not an object")
        for key in ("method", "data"):
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise refuse(f"has a 'config.{key}' that is not an object")
    if status != "completed":
        if version >= 2:
            if not isinstance(record["error"], str):
                raise refuse("has an 'error' that is not a string")
            if record["error_kind"] not in ERROR_KINDS:
                raise refuse(f"has error_kind {record['error_kind']!r}; expected one of {', '.join(ERROR_KINDS)}")
        return version
    for key in ("best", "last"):
        row = record[key]
        if not isinstance(row, dict) or not is_integer(row.get("epoch")) or row["epoch"] < 1:
            raise refuse(f"has a '{key}' that is not an epoch's metrics (an object with the epoch number)")
    parameters = record["parameters"]
    if not isinstance(parameters, dict) or not all(is_number(parameters.get(k)) for k in ("trainable", "total")):
        raise refuse("has 'parameters' without the numbers 'trainable' and 'total'")
    if not isinstance(record["measurements"], dict):
        raise refuse("has 'measurements' that are not an object")
    if version >= 2:
        _check_files(record, refuse)
    return version


def _check_files(record: dict, refuse) -> None:
    files = record["files"]
    if not isinstance(files, dict):
        raise refuse("has 'files' that are not an object")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not is_integer(entry.get("epoch")) or entry.get("holds") not in HOLDS:
            raise refuse(f"has files[{name!r}] that is not an object with an 'epoch' and 'holds' (best or last)")
        sha256 = entry.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
            raise refuse(f"has files[{name!r}] with a 'sha256' that is not 64 hexadecimal digits")
        holds, epoch = entry["holds"], record[entry["holds"]]["epoch"]
        if entry["epoch"] != epoch:
            raise refuse(f"says {name} holds the {holds} epoch, {entry['epoch']}, but its {holds} epoch is {epoch}")
    if STATE_FILE not in files:
        raise refuse(f"has 'files' without {STATE_FILE}")
    if DELTA_FILE in files and "delta_w_shapes" not in record:
        raise refuse(f"lists {DELTA_FILE} without 'delta_w_shapes'")
    shapes = record.get("delta_w_shapes", {})
    if not isinstance(shapes, dict) or not all(
            isinstance(s, list) and len(s) == 2 and all(is_integer(n) and n > 0 for n in s) for s in shapes.values()):
        raise refuse("has 'delta_w_shapes' that do not map module names to [out, in]")
    if record_version(record) >= 3 and "delta_w_shapes" in record:
        how, fingerprints = record.get("delta_w"), record.get("base_sha256")
        if not isinstance(how, str) or not how.startswith(("derived:", "none:")):
            raise refuse("has 'delta_w_shapes' without a 'delta_w' that says 'derived: ...' or 'none: ...'")
        if not isinstance(fingerprints, dict) or set(fingerprints) != set(shapes) or not all(
                isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in fingerprints.values()):
            raise refuse("has 'base_sha256' that does not map each module of 'delta_w_shapes' to 64 hexadecimal digits")


def read_record(path: Path) -> dict:
    """A record.json, checked (``check_record``); a file that cannot be read or parsed is refused."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError("record", str(path), f"cannot be read ({first_line(error)})") from None
    except UnicodeDecodeError:
        raise ConfigError("record", str(path), "is not UTF-8 text; the file is corrupt") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("record", str(path), f"is not valid JSON ({error.msg} at line {error.lineno} column "
                          f"{error.colno}); the file is truncated or corrupt") from None
    except RecursionError:
        raise ConfigError("record", str(path), "is not a run record (nested too deeply)") from None
    check_record(record, path)
    return record


def load_record(run_dir: Path, require_completed: bool = True) -> dict:
    """The checked record of a run directory, with "run_dir" added. ``require_completed``: refuse a run
    that did not complete (failed, diverged, preempted, interrupted)."""
    run_dir = Path(run_dir)
    path = run_dir / RECORD_FILE
    if not path.exists():
        raise ConfigError("run", str(run_dir), f"has no {RECORD_FILE}; not a lora_lab run directory")
    record = read_record(path)
    if require_completed and record.get("status") != "completed":
        raise ConfigError("run", str(run_dir), f"did not complete (status {record.get('status')!r})")
    record["run_dir"] = str(run_dir)
    return record


def delta_epoch(record: dict) -> str | None:
    """Which epoch the run's ΔW comes from, in words: "epoch 3 (best)" (versions 2 and 3, from "files"),
    "last epoch" (version 1, whose files hold the last epoch); None when the record lists no ΔW."""
    if record_version(record) < 2:
        return "last epoch"
    if record_version(record) >= 3:  # derived from the state, which holds the best epoch
        if "delta_w_shapes" not in record:
            return None
        entry = (record.get("files") or {}).get(STATE_FILE)
        return f"epoch {entry['epoch']} ({entry['holds']})"
    entry = (record.get("files") or {}).get(DELTA_FILE)
    return None if entry is None else f"epoch {entry['epoch']} ({entry['holds']})"


class DeltaWeightsFile:
    """delta_w.safetensors opened for reading: the header is checked at once, each module's tensors are
    read (memory-mapped) when asked for. Safetensors only: nothing is unpickled.

    Refused, with a ConfigError naming the file: a file safetensors cannot parse (truncated, corrupt,
    not safetensors at all); tensor names other than "<module>::<part>"; parts that are not
    floating-point matrices; parts that do not fit together (B's columns and A's rows, W0 and ΔW of
    one shape; a dense ΔW or both factors); with ``expected`` (a record's "delta_w_shapes"), other
    modules or shapes than the record states. Reading a module refuses non-finite values.
    """

    def __init__(self, path: Path, expected: dict | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise ConfigError("run", str(self.path.parent), f"has no {DELTA_FILE} (no ΔW was saved for this run)")
        try:
            header, metadata = read_header(self.path)
        except UnreadableTensors as error:
            raise self._refuse(f"cannot be read as safetensors ({error}); "
                               "the file is truncated or corrupt") from None
        try:
            self.kinds = json.loads(metadata.get("kinds", "{}"))
        except json.JSONDecodeError:
            self.kinds = None
        if not isinstance(self.kinds, dict) or not all(isinstance(v, str) for v in self.kinds.values()):
            raise self._refuse("has a 'kinds' entry in its metadata that is not a JSON object of module kinds")
        parts: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, (shape, dtype) in header.items():
            name, sep, part = key.rpartition("::")
            if not sep or not name or part not in _PARTS:
                raise self._refuse(f"holds a tensor named {key!r}; ΔW tensors are named "
                                   f"'<module>::<part>' with a part among {', '.join(_PARTS)}")
            if dtype not in _FLOAT_DTYPES or len(shape) != 2:
                raise self._refuse(f"holds {key} as a {dtype} tensor of shape {shape}; "
                                   "ΔW parts are floating-point matrices")
            parts.setdefault(name, {})[part] = shape
        self.shapes: dict[str, tuple[int, int]] = {}
        self.factored: dict[str, bool] = {}
        for name, p in parts.items():
            self.shapes[name], self.factored[name] = self._module_shape(name, p), "dense" not in p
        self._parts = parts  # no entries: the method changed no weight matrix (ΔW = 0, e.g. BitFit)
        if expected is not None:
            self._check_expected(expected)

    def _refuse(self, problem: str) -> ConfigError:
        return ConfigError("delta_w", str(self.path), problem)

    def _module_shape(self, name: str, p: dict) -> tuple[int, int]:
        if "dense" in p:
            if "B" in p or "A" in p:
                raise self._refuse(f"holds both a dense ΔW and factors B, A for {name}")
            shape = p["dense"]
        elif "B" in p and "A" in p:
            if p["B"][1] != p["A"][0]:
                raise self._refuse(f"holds factors of {name} that do not multiply: B {p['B']}, A {p['A']}")
            shape = (p["B"][0], p["A"][1])
        else:
            raise self._refuse(f"holds neither a dense ΔW nor both factors B and A for {name}")
        if "base" in p and p["base"] != shape:
            raise self._refuse(f"holds W0 of shape {p['base']} for {name} but ΔW of shape {shape}")
        return shape

    def _check_expected(self, expected: dict) -> None:
        want = {name: tuple(shape) for name, shape in expected.items()}
        missing, extra = sorted(set(want) - set(self.shapes)), sorted(set(self.shapes) - set(want))
        if missing:
            raise self._refuse(f"lacks ΔW of {len(missing)} module(s) its {RECORD_FILE} lists, e.g. {missing[0]}")
        if extra:
            raise self._refuse(f"holds ΔW of {len(extra)} module(s) its {RECORD_FILE} does not list, e.g. {extra[0]}")
        for name in sorted(want):
            if self.shapes[name] != want[name]:
                raise self._refuse(f"holds ΔW of shape {self.shapes[name]} for {name}; "
                                   f"its {RECORD_FILE} says {want[name]}")

    def load(self, name: str) -> DeltaW:
        d = DeltaW(kind=self.kinds.get(name, "weight_difference"))
        try:
            tensors = read_tensors(self.path, [f"{name}::{part}" for part in self._parts[name]])
        except UnreadableTensors as error:  # e.g. the file changed since it was opened
            raise self._refuse(f"cannot be read ({error}); the file is truncated or corrupt") from None
        for part in self._parts[name]:
            setattr(d, part, tensors[f"{name}::{part}"])
        for part in self._parts[name]:
            if not torch.isfinite(getattr(d, part)).all():
                raise self._refuse(f"holds non-finite values in {name}::{part}; the file is corrupt")
        return d

    def load_all(self) -> dict[str, DeltaW]:
        return {name: self.load(name) for name in self._parts}


def load_delta_weights(path: Path, expected: dict | None = None) -> dict[str, DeltaW]:
    """Every module's ΔW from a delta_w.safetensors, checked (``DeltaWeightsFile``); ``expected``: the
    record's "delta_w_shapes", when it has them."""
    return DeltaWeightsFile(path, expected).load_all()


def open_delta_weights(record: dict) -> DeltaWeightsFile:
    """The ΔW file of a run whose record ``load_record`` returned, checked against what the record
    says of it: a version 2 record lists the file (and the epoch it holds) and the shapes."""
    run_dir = Path(record["run_dir"])
    path = run_dir / DELTA_FILE
    if record_version(record) < 2:
        return DeltaWeightsFile(path)
    if record_version(record) >= 3:
        raise ConfigError("run", str(run_dir), f"has no {DELTA_FILE}: from schema version 3 ΔW is derived from "
                          f"{STATE_FILE} and the base model (lora_lab.runtime.rebuild.open_run_deltas)")
    if DELTA_FILE not in (record.get("files") or {}):
        if path.exists():
            raise ConfigError("record", str(run_dir / RECORD_FILE), f"does not list the {DELTA_FILE} beside it, "
                              "so which epoch that ΔW holds is unknown")
        raise ConfigError("run", str(run_dir), f"has no {DELTA_FILE} (no ΔW was saved for this run)")
    verify_run_file(record, DELTA_FILE)
    return DeltaWeightsFile(path, record.get("delta_w_shapes"))


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
