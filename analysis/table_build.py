"""The table of a set of runs: one row per method and size, one column per task, each cell the
median over seeds (or mean ± std) of the task's metric on test, with ``--tune KEY`` at the value of KEY
whose median validation metric is best for that row and task (the fair protocol). Runs of one method
and task that differ in a model or data setting, or in a ``--by KEY``, are rows of their own, labelled
with their values; runs of one row that differ in any other setting are an error, so seeds are never
mixed across configurations by accident; so are runs of one task that declare different main metrics."""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import PurePath

from lora_lab.analysis.runs import Run, _hashable, flatten, lookup, row_label, row_sort_key, run_task
from lora_lab.config.run_identity import ADDED_DEFAULTS  # noqa: E402 - beside the keys it qualifies
from lora_lab.tasks.metrics import is_better, metric_name

IGNORED_KEYS = ("seed", "logger.", "record.", "trainer.progress_bar", "trainer.threads", "trainer.device",
                "trainer.log_every", "trainer.latency_repeats", "trainer.throughput_warmup_steps",
                "data.cache_dir", "trainer.eval_batch_size", "dry_run",
                "study.")  # a study's bookkeeping (its rate grids and choices): trainer.lr holds the rate


class TableError(ValueError):
    """Runs that cannot be tabulated as asked; the message is the one-line explanation."""


def task_metric(task: str, runs: list[Run], metric: str | None = None) -> str:
    """The metric of a task's column: the one its runs were read with. Runs declaring different ones
    are an error, so a column never mixes metrics."""
    declared = [r for r in runs if r.metric]
    for run in declared[1:]:
        if run.metric != declared[0].metric:
            raise TableError(f"the runs of {task!r} have different main metrics ({declared[0].metric} vs "
                             f"{run.metric}, {run.source}); pass --metric to choose one")
    if metric and declared and declared[0].metric != metric:
        raise TableError(f"the runs of {task!r} were read for {declared[0].metric}, not {metric} "
                         f"({declared[0].source})")
    return metric or (declared[0].metric if declared else "accuracy")


def check_same_settings(runs: list[Run], row: str, tune: list[str]) -> None:
    """The completed runs of one row (and one tuned value) may differ in seed only."""
    ignored = tuple(IGNORED_KEYS) + tuple(tune)
    # a setting added after some of the runs were made is, in those runs, its default
    added = {f"{section}.{key}": value for section, keys in ADDED_DEFAULTS.items() for key, value in keys.items()}
    flat = [{k: v for k, v in {**added, **flatten(r.config)}.items() if not k.startswith(ignored)} for r in runs]
    for other, run in zip(flat[1:], runs[1:]):
        diff = sorted(k for k in set(flat[0]) | set(other) if flat[0].get(k) != other.get(k))
        if diff:
            key = diff[0]
            raise TableError(f"the runs of {row!r} differ in {key}: {flat[0].get(key)!r} in {runs[0].source}, "
                             f"{other.get(key)!r} in {run.source}; pass --by {key} to show them as rows of "
                             f"their own, or --tune {key} to choose it on validation")


def split_keys(runs: list[Run], tune: list[str], by: list[str]) -> list[str]:
    """The keys whose values label rows: ``by``, then the model and data settings in which completed
    runs of one method and task differ (only the model's name when the names differ)."""
    ignored = tuple(IGNORED_KEYS) + tuple(tune)
    groups: dict = defaultdict(list)
    for run in runs:
        if run.completed:
            groups[(row_label(run), run_task(run))].append(flatten(run.config))
    found = set()
    for flats in groups.values():
        for key in set().union(*flats):
            if (key.startswith(("model.", "data.")) and not key.startswith(ignored)
                    and len({repr(f.get(key)) for f in flats}) > 1):
                found.add(key)
    if "model.name" in found:
        found = {k for k in found if k == "model.name" or not k.startswith("model.")}
    return list(by) + sorted(found - set(by), key=lambda k: (not k.startswith("model."), k))


def split_label(run: Run, keys: list[str]) -> str:
    """The run's row: its method's label, then its values of ``keys``
    (``LoRA r=8 α=8 (q+v), tiny-random-bert, max_eval=32``)."""
    flat = flatten(run.config)
    parts = [str(flat[k]) if k == "model.name" else f"{k.rsplit('.', 1)[-1]}={flat[k]}" for k in keys if k in flat]
    return ", ".join([row_label(run), *parts])


def aggregate(values: list[float], how: str) -> tuple[float, float | None]:
    if not values:
        return math.nan, None
    if how == "median":
        return statistics.median(values), None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Cell:
    value: float
    spread: float | None
    seeds: int
    failed: int
    chosen: dict
    values: list = field(default_factory=list)  # per-seed test values behind the cell
    runs: list = field(default_factory=list)    # the completed runs behind the cell (``Run``)


@dataclass
class Table:
    rows: list[str]
    tasks: list[str]
    cells: dict            # (row, task) -> Cell
    params: dict           # row -> (trainable, total)
    efficiency: dict       # row -> (peak memory MB, samples/s), medians over the chosen runs
    members: dict          # row -> every run of that row (completed or not), in input order
    selection: list[dict]  # one entry per (row, task, tuned value)
    metrics: dict          # task -> the metric its column shows
    epoch: str
    agg: str
    tune: list[str]
    expected: list[dict] = field(default_factory=list)  # reference rows (e.g. a paper's), x100
    baselines: dict = field(default_factory=dict)       # task -> (baseline name, median test value)
    groups: dict = field(default_factory=dict)  # (row, task) -> {tuned values: the completed runs}
    stats: object = None  # what ``table_stats.add_statistics`` found (intervals, tests, ranking); None: none

    @property
    def metric(self) -> str | None:
        """The metric of every column; None when the tasks' metrics differ."""
        distinct = set(self.metrics.values())
        return distinct.pop() if len(distinct) == 1 else None

    def column(self, task: str) -> str:
        """A task's column header: with its metric when the columns' metrics differ."""
        return task if self.metric else f"{task} ({metric_name(self.metrics[task])})"

    def average(self, row: str) -> float:
        values = [self.cells[(row, t)].value for t in self.tasks if (row, t) in self.cells]
        return statistics.fmean(values) if len(values) == len(self.tasks) else math.nan


def build_table(runs: list[Run], metric: str | None = None, epoch: str = "best", agg: str = "median",
                tune: list[str] | None = None, by: list[str] | None = None) -> Table:
    """The table of ``runs`` (``run_from_record``). ``metric`` None: each task's column shows the
    metric its runs were read with (their main metric); a name: every column shows it. ``by``: keys
    whose values give rows of their own (``split_keys``)."""
    tune = list(tune or [])
    for key in by or []:
        if not any(key in flatten(run.config) for run in runs if run.completed):
            raise TableError(f"--by {key}: is not a key of the runs' configs")
    keys = split_keys(runs, tune, list(by or []))
    grouped: dict = defaultdict(lambda: defaultdict(list))
    order: dict[str, tuple] = {}
    members: dict[str, list] = defaultdict(list)
    by_task: dict[str, list] = defaultdict(list)
    for run in runs:
        row = split_label(run, keys)
        members[row].append(run)
        by_task[run_task(run)].append(run)
        order[row] = min(order.get(row, (99,)), row_sort_key(run))
        # a run that did not complete may lack the key (e.g. it failed resolving its config)
        tuned = tuple(_hashable(lookup(run.config, key, required=run.status == "completed")) for key in tune)
        grouped[(row, run_task(run))][tuned].append(run)
    metrics = {task: task_metric(task, task_runs, metric) for task, task_runs in sorted(by_task.items())}

    cells, selection, chosen_runs = {}, [], defaultdict(list)
    for (row, task), by_value in grouped.items():
        best_value, best_val, entries = None, None, []
        m = metrics[task]
        for tuned, group in sorted(by_value.items(), key=lambda kv: str(kv[0])):
            done = [r for r in group if r.completed]
            check_same_settings(done, row, tune)
            val, _ = aggregate([r.val for r in done], "median")
            test, _ = aggregate([r.test for r in done], "median")
            entry = {"row": row, "task": task, **dict(zip(tune, tuned)), "seeds": len(done),
                     "failed": len(group) - len(done), "metric": m, f"validation_{m}": val, f"test_{m}": test,
                     "runs": " ".join(sorted(PurePath(r.source).name or r.source for r in group))}
            entries.append(entry)
            if done and is_better(m, val, best_val):
                best_value, best_val = tuned, val
        selection.extend(entries)
        if best_value is None:
            failed = sum(len(g) for g in by_value.values())
            cells[(row, task)] = Cell(math.nan, None, 0, failed, {})
            continue
        done = [r for r in by_value[best_value] if r.completed]
        value, spread = aggregate([r.test for r in done], agg)
        cells[(row, task)] = Cell(value, spread, len(done), len(by_value[best_value]) - len(done),
                                  dict(zip(tune, best_value)), [r.test for r in done], done)
        for entry in entries:
            entry["chosen"] = all(entry.get(k) == v for k, v in zip(tune, best_value))
        chosen_runs[row].extend(done)

    rows = sorted(order, key=lambda r: (order[r], r))
    tasks = sorted({task for _, task in grouped})
    baselines = {}
    for task in tasks:
        found = [r.baseline for r in by_task[task] if r.completed and r.baseline]
        if found:
            name = Counter(n for n, _ in found).most_common(1)[0][0]
            baselines[task] = (name, statistics.median(v for _, v in found))
    params, efficiency = {}, {}
    for row in rows:
        done = chosen_runs.get(row) or [r for r in members[row] if r.completed]
        trainable = [r.trainable for r in done if r.trainable is not None]
        total = [r.total for r in done if r.total is not None]
        params[row] = (statistics.median(trainable) if trainable else None, statistics.median(total) if total else None)
        memory = [r.peak_memory_mb for r in done if r.peak_memory_mb is not None]
        speed = [r.samples_per_s for r in done if r.samples_per_s is not None and math.isfinite(r.samples_per_s)]
        efficiency[row] = (statistics.median(memory) if memory else None, statistics.median(speed) if speed else None)
    groups = {key: {tuned: [r for r in group if r.completed] for tuned, group in by_value.items()}
              for key, by_value in grouped.items()}
    return Table(rows, tasks, cells, params, efficiency, dict(members), selection, metrics, epoch, agg, tune,
                 baselines=baselines, groups=groups)
