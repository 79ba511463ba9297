"""Run records as a table reads them: one ``Run`` per record (a local run directory or a W&B run),
with its task, the metric its column shows, that metric on validation and test at the epoch asked
for, its cost, and where its per-example test results are (``predictions.safetensors``).

The metric is the task's main metric as the record declares it (``task.main_metric``; records written
before tasks declared one: ``trainer.monitor``, else accuracy) unless one is asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from lora_lab.errors import ConfigError
from lora_lab.methods import Method, describe_method
from lora_lab.runtime.predictions import ExamplePredictions, read_predictions
from lora_lab.runtime.records import PREDICTIONS_FILE, RECORD_FILE, check_digest, find_run_dirs, load_record
from lora_lab.tasks.task_types import TASK_TYPES, task_name


@dataclass
class Run:
    """What a table needs from one run record."""
    config: dict
    status: str
    val: float | None = None
    test: float | None = None
    trainable: int | None = None
    total: int | None = None
    peak_memory_mb: float | None = None
    samples_per_s: float | None = None
    resolved: dict = field(default_factory=dict)
    source: str = ""
    error: str = ""  # why a run that did not complete stopped (its record's first error line)
    task: str = ""   # the task's name; empty: read from the config (``task_label``)
    metric: str = ""  # the metric val and test hold; empty for a stopped run that declares none
    baseline: tuple | None = None  # (name, test value of ``metric``) of the record's baseline
    task_type: str = "classification"
    predictions: Path | None = None  # its per-example test results of the epoch read, when it has them
    predictions_sha256: str | None = None  # their SHA-256 as the record lists it (None: written before digests)
    epoch: int | None = None          # the epoch read

    @cached_property
    def method(self) -> Method:
        """The run's method, described from its config (row label, size, order, plot style)."""
        return describe_method(self.config.get("method"), self.resolved)

    @property
    def completed(self) -> bool:
        return self.status == "completed" and self.val is not None and math.isfinite(self.val)

    @property
    def seed(self):
        return self.config.get("seed")

    @cached_property
    def examples(self) -> ExamplePredictions | None:
        """Its per-example test results (checked: ``read_predictions``, of the epoch read and of the
        run's task type), or None when the record lists none for that epoch."""
        if self.predictions is None:
            return None
        if not self.predictions.exists():
            raise ConfigError("record", _record_name(self.source), f"lists {PREDICTIONS_FILE}, which is missing")
        check_digest(self.predictions, self.predictions_sha256, f"its {RECORD_FILE}")
        found = read_predictions(self.predictions)
        if found.epoch != self.epoch or found.task_type != self.task_type:
            raise ConfigError("predictions", str(self.predictions), f"holds epoch {found.epoch} of a {found.task_type} "
                              f"task; its record reports epoch {self.epoch} of a {self.task_type} task")
        return found


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def lookup(config: dict, dotted: str, required: bool = True):
    """The value of a dotted key; an absent key is an error, or None when not ``required``."""
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            if not required:
                return None
            raise ConfigError("--tune", dotted, "is not a key of the runs' configs")
        value = value[part]
    return value


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _record_name(source: str) -> str:
    """How an error names a run's record: its record.json for a run directory, else the source."""
    return source if not source or source.startswith("wandb:") else str(Path(source) / RECORD_FILE)


def _declared_task(record: dict) -> dict:
    task = record.get("task")
    return task if isinstance(task, dict) else {}


def main_metric(record: dict) -> str:
    """The metric a record's task is judged by: the one its task declares; for records written before
    tasks declared one, the metric that chose the best epoch (trainer.monitor), else accuracy."""
    declared = _declared_task(record).get("main_metric")
    if isinstance(declared, str) and declared:
        return declared
    monitor = lookup(record.get("config") or {}, "trainer.monitor", required=False)
    return monitor if isinstance(monitor, str) and monitor else "accuracy"


def record_task(record: dict) -> str:
    """The task a record belongs to: the name it declares, else what its config names."""
    name = _declared_task(record).get("name")
    return str(name) if name else task_label(record.get("config") or {})


def record_baseline(record: dict, metric: str) -> tuple | None:
    """(name, test value in ``metric``) of a record's baseline, or None when it has none."""
    baseline = record.get("baseline")
    test = baseline.get("test") if isinstance(baseline, dict) else None
    value = _number(test.get(metric)) if isinstance(test, dict) else None
    return None if value is None else (str(baseline.get("name") or "baseline"), value)


def run_from_record(record: dict, metric: str | None, epoch: str, source: str = "") -> Run:
    """What a table needs from a record (``load_record`` has checked a local one). A run that did not
    complete keeps its status and error; a completed one needs the metric at ``epoch``, as numbers.
    ``metric`` None: the record's own main metric (``main_metric``)."""
    config = record.get("config") or {}
    task = record_task(record)
    if record.get("status") != "completed":
        error = str(record.get("error") or "").strip()
        declared = _declared_task(record).get("main_metric")
        return Run(config=config, status=str(record.get("status") or "failed"), source=source,
                   error=error.splitlines()[0] if error else "", task=task,
                   metric=metric or (declared if isinstance(declared, str) else ""))
    row = record[epoch]
    if metric and f"validation/{metric}" not in row:
        raise ConfigError("--metric", metric, f"is not in the records (have: "
                          f"{sorted(k.split('/', 1)[1] for k in row if k.startswith('validation/'))})")
    metric = metric or main_metric(record)
    val, test = row.get(f"validation/{metric}"), row.get(f"test/{metric}")
    non_finite = record.get("non_finite") or {}  # strict JSON wrote null where the value was NaN or infinite
    val, test = (math.nan if value is None and f"{epoch}.{split}/{metric}" in non_finite else value
                 for split, value in (("validation", val), ("test", test)))
    for split, value in (("validation", val), ("test", test)):
        if _number(value) is None:
            found = "no" if value is None else f"a non-numeric {value!r} as"
            raise ConfigError("record", _record_name(source), f"has {found} {split}/{metric} in '{epoch}'")
    p, m = record.get("parameters") or {}, record.get("measurements") or {}
    return Run(config=config, status="completed", val=val, test=test,
               trainable=_number(p.get("trainable")), total=_number(p.get("total")),
               peak_memory_mb=_number(m.get("peak_memory_mb")), samples_per_s=_number(m.get("train_samples_per_s")),
               resolved=record.get("method_resolved") or {}, source=source, task=task, metric=metric,
               baseline=record_baseline(record, metric), task_type=record_task_type(record),
               predictions=_predictions_path(record, row, source), epoch=row.get("epoch"),
               predictions_sha256=((record.get("files") or {}).get(PREDICTIONS_FILE) or {}).get("sha256"))


def record_task_type(record: dict) -> str:
    declared = _declared_task(record).get("type")
    configured = ((record.get("config") or {}).get("data") or {}).get("task_type")
    return str(declared or configured or "classification")


def _predictions_path(record: dict, row: dict, source: str) -> Path | None:
    """The run's per-example test results of the epoch ``row`` reports, when its record lists them for
    that epoch (they hold the best epoch: the last epoch's are there only when it is the best)."""
    entry = (record.get("files") or {}).get(PREDICTIONS_FILE)
    if not isinstance(entry, dict) or entry.get("epoch") != row.get("epoch") or not source \
            or source.startswith("wandb:"):
        return None
    return Path(source) / PREDICTIONS_FILE


def record_from_wandb(config: dict, summary: dict, state: str) -> dict:
    """A W&B run (config + summary, as the trainer logs them) in the shape of a local run record:
    ``task/*`` becomes its "task", the numbers of ``baseline/*`` its baseline's test metrics (the
    baseline named after the task's type: majority class, constant, all O)."""
    def section(prefix):
        return {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix)}

    extra = {}
    if section("task/"):
        extra["task"] = section("task/")
    baseline = {k: v for k, v in section("baseline/").items() if _number(v) is not None}
    if baseline:
        kind = TASK_TYPES.get(summary.get("task/type"))
        extra["baseline"] = {"name": kind.baseline if kind else "baseline", "test": baseline}
    if state != "finished" or "best/epoch" not in summary:
        return {"status": "failed" if state in ("failed", "crashed", "killed") else state, "config": config, **extra}
    return {"status": "completed", "config": config, "best": section("best/"), "last": section("last/"),
            "parameters": section("parameters/"), "measurements": section("measure/"), **extra}


def load_wandb_records(path: str, group: str | None = None) -> list[tuple[str, dict]]:
    import wandb

    filters = {"group": group} if group else None
    out = []
    for run in wandb.Api().runs(path, filters=filters):
        config = {k: v for k, v in run.config.items() if not k.startswith("_")}
        out.append((f"wandb:{run.path[-1]}", record_from_wandb(config, dict(run.summary), run.state)))
    if not out:
        raise ConfigError("--wandb", path, f"has no runs{f' in group {group}' if group else ''}")
    return out


def row_label(run: Run) -> str:
    return run.method.label()


def row_sort_key(run: Run) -> tuple:
    return run.method.sort_key()


def task_label(config: dict) -> str:
    return task_name(config.get("data") or {})


def run_task(run: Run) -> str:
    return run.task or task_label(run.config)


def collect_runs(paths: list[Path], metric: str | None, epoch: str, wandb_path: str | None = None,
                 wandb_group: str | None = None) -> list[Run]:
    runs = []
    if paths:
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise ConfigError("runs", missing[0], "does not exist")
        run_dirs = find_run_dirs(*paths)
        if not run_dirs:
            raise ConfigError("runs", [str(p) for p in paths], f"contain no {RECORD_FILE}")
        runs += [run_from_record(load_record(d, require_completed=False), metric, epoch, str(d)) for d in run_dirs]
    if wandb_path:
        runs += [run_from_record(r, metric, epoch, s) for s, r in load_wandb_records(wandb_path, wandb_group)]
    if not runs:
        raise ConfigError("runs", None, "none given: pass run or sweep directories, or --wandb ENTITY/PROJECT")
    return runs


