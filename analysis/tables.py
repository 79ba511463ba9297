"""Paper-style tables from run records: one row per method and size, one column per task.

    lora-lab-table outputs/embedded_study/2026-11-22_22-18-15 --tune trainer.lr --out report/
    lora-lab-table outputs/multirun/a outputs/multirun/b --epoch last --agg mean_std
    lora-lab-table --wandb my-team/lora_lab --wandb-group 2026-11-22_22-18-15 --out report/

Each cell is the median over seeds (or mean ± std) of the test metric at the best epoch (chosen on
validation) or the last epoch. The metric of a column is its task's main metric, as the records
declare it (``task.main_metric``; records written before tasks declared one: ``trainer.monitor``,
else accuracy), so one table may show accuracy for one task and entity F1 for another: the header
then names each column's metric, the caption lists them and "Avg." is the mean of the columns, as in
GLUE tables. ``--metric NAME`` shows NAME for every task instead. With ``--tune KEY`` (e.g.
trainer.lr) the runs of a row are split by that key's value, the value with the best median
validation metric (the task's own; best is lowest for perplexity and loss, highest for the others)
is chosen per row and task, and the cell reports test at that value: the fair protocol in which
every method gets the same grid. Runs of one row that differ in any other setting are an error, so
seeds are never mixed across configurations by accident; so are runs of one task that declare
different main metrics. Bold marks each column's best value in its metric's direction.

Writes <name>.md, <name>.tex (booktabs), <name>.csv (``<task>_<metric>`` and ``<task>_seeds`` per
task) and <name>_selection.csv (every configuration with its seed count and validation/test medians:
one ``validation_<metric>``, ``test_<metric>`` column pair per metric the table shows, filled for the
entries of the tasks shown in that metric and empty for the others); with ``--plot`` also the metric
vs trainable parameters and vs LoRA rank. When the records carry a baseline (e.g. the majority class,
or all "O" for token classification), the caption gives its test value per task.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from lora_lab.analysis.table_plots import plot_accuracy_vs_parameters, plot_accuracy_vs_rank
from lora_lab.errors import ConfigError
from lora_lab.markdown import markdown_table
from lora_lab.methods import Method, describe_method
from lora_lab.runtime.records import RECORD_FILE, find_run_dirs, load_record, write_text
from lora_lab.runtime.tracking import Tracker
from lora_lab.tasks.metrics import display_scale, higher_is_better, is_better, metric_name
from lora_lab.tasks.task_types import TASK_TYPES, task_name

# Settings that do not change what a run learns; they may differ between the seeds of one row.
IGNORED_KEYS = ("seed", "logger.", "record.", "trainer.progress_bar", "trainer.threads", "trainer.device",
                "trainer.log_every", "trainer.latency_repeats", "trainer.throughput_warmup_steps",
                "data.cache_dir", "trainer.eval_batch_size", "dry_run")


class TableError(ValueError):
    """Runs that cannot be tabulated as asked; the message is the one-line explanation."""


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

    @cached_property
    def method(self) -> Method:
        """The run's method, described from its config (row label, size, order, plot style)."""
        return describe_method(self.config.get("method"), self.resolved)

    @property
    def completed(self) -> bool:
        return self.status == "completed" and self.val is not None and math.isfinite(self.val)


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
    for split, value in (("validation", val), ("test", test)):
        if _number(value) is None:
            found = "no" if value is None else f"a non-numeric {value!r} as"
            raise ConfigError("record", _record_name(source), f"has {found} {split}/{metric} in '{epoch}'")
    p, m = record.get("parameters") or {}, record.get("measurements") or {}
    return Run(config=config, status="completed", val=val, test=test,
               trainable=_number(p.get("trainable")), total=_number(p.get("total")),
               peak_memory_mb=_number(m.get("peak_memory_mb")), samples_per_s=_number(m.get("train_samples_per_s")),
               resolved=record.get("method_resolved") or {}, source=source, task=task, metric=metric,
               baseline=record_baseline(record, metric))


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
    flat = [{k: v for k, v in flatten(r.config).items() if not k.startswith(ignored)} for r in runs]
    for other, run in zip(flat[1:], runs[1:]):
        diff = sorted(k for k in set(flat[0]) | set(other) if flat[0].get(k) != other.get(k))
        if diff:
            key = diff[0]
            raise TableError(f"the runs of {row!r} differ in {key} ({flat[0].get(key)!r} vs "
                             f"{other.get(key)!r}, {run.source}); pass --tune {key} to choose it on validation")


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
                tune: list[str] | None = None) -> Table:
    """The table of ``runs`` (``run_from_record``). ``metric`` None: each task's column shows the
    metric its runs were read with (their main metric); a name: every column shows it."""
    tune = list(tune or [])
    grouped: dict = defaultdict(lambda: defaultdict(list))
    order: dict[str, tuple] = {}
    members: dict[str, list] = defaultdict(list)
    by_task: dict[str, list] = defaultdict(list)
    for run in runs:
        row = row_label(run)
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
                     "failed": len(group) - len(done), "metric": m, f"validation_{m}": val, f"test_{m}": test}
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
                                  dict(zip(tune, best_value)), [r.test for r in done])
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
    return Table(rows, tasks, cells, params, efficiency, dict(members), selection, metrics, epoch, agg, tune,
                 baselines=baselines)


# ---------------------------------------------------------------- formatting

def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{n:.0f}"


def format_cell(cell: Cell | None, agg: str, scale: float = 100.0) -> str:
    if cell is None or not math.isfinite(cell.value):
        return "failed" if cell is not None and cell.failed else "-"
    text = f"{scale * cell.value:.1f}"
    if agg == "mean_std" and cell.spread is not None:
        text += f" ± {scale * cell.spread:.1f}"
    return text


def table_cells(table: Table) -> tuple[list[str], list[list[str]], dict]:
    """Header, formatted rows and, per value column, the indices of the rows holding its best value."""
    header = ["Method", "Trainable params", "% of total", *[table.column(t) for t in table.tasks]]
    if len(table.tasks) > 1:
        header.append("Avg.")
    header += ["Peak memory (MB)", "Train samples/s"]
    if table.tune and len(table.tasks) == 1:
        header += [f"chosen {k}" for k in table.tune]
    rows = []
    for row in table.rows:
        trainable, total = table.params[row]
        percent = f"{100 * trainable / total:.2f}" if trainable is not None and total else "-"
        line = [row, human_count(trainable), percent]
        line += [format_cell(table.cells.get((row, task)), table.agg, display_scale(table.metrics[task]))
                 for task in table.tasks]
        if len(table.tasks) > 1:
            avg = table.average(row)
            scale = display_scale(table.metrics[table.tasks[0]])
            line.append(f"{scale * avg:.1f}" if math.isfinite(avg) else "-")
        memory, speed = table.efficiency[row]
        line += [f"{memory:.0f}" if memory else "-", f"{speed:.1f}" if speed else "-"]
        if table.tune and len(table.tasks) == 1:
            cell = table.cells.get((row, table.tasks[0]))
            line += [f"{cell.chosen.get(k):g}" if cell and isinstance(cell.chosen.get(k), float)
                     else str(cell.chosen.get(k, "-") if cell else "-") for k in table.tune]
        rows.append(line)
    # each task column's best is its metric's; Avg. has one only when every column agrees on the direction
    directions = {3 + i: higher_is_better(table.metrics[t]) for i, t in enumerate(table.tasks)}
    if len(table.tasks) > 1 and len(set(directions.values())) == 1:
        directions[3 + len(table.tasks)] = next(iter(directions.values()))
    best = _best_rows(rows, directions)
    for reference in table.expected:  # after the best values are found: only our runs are bolded
        values = [reference.get(task) for task in table.tasks]
        line = [reference["method"], reference.get("trainable params") or "-", "-"]
        line += [f"{float(v):.1f}" if v not in (None, "") else "-" for v in values]
        if len(table.tasks) > 1:
            known = [float(v) for v in values if v not in (None, "")]
            line.append(f"{statistics.fmean(known):.1f}" if len(known) == len(values) else "-")
        line += ["-"] * (len(header) - len(line))
        rows.append(line)
    return header, rows, best


def _best_rows(rows: list[list[str]], directions: dict[int, bool]) -> dict:
    """Per value column (index -> higher is better), the rows holding its best value."""
    best = {}
    for column, higher in directions.items():
        scores = {i: float(r[column].split(" ")[0]) for i, r in enumerate(rows) if _is_number(r[column])}
        if scores:
            top = max(scores.values()) if higher else min(scores.values())
            best[column] = {i for i, v in scores.items() if v == top}
    return best


def _is_number(text: str) -> bool:
    try:
        float(text.split(" ")[0])
        return True
    except ValueError:
        return False


def caption(table: Table) -> str:
    how = "median over seeds" if table.agg == "median" else "mean ± std over seeds"
    epoch = "best epoch on validation" if table.epoch == "best" else "last epoch"
    if table.metric:
        what = metric_name(table.metric)
        text = f"Test {what}{' (x100)' if display_scale(table.metric) != 1 else ''}, {how}, {epoch}."
    else:
        what = "metric"
        columns = ", ".join(f"{t} {metric_name(table.metrics[t])}{' x100' if display_scale(table.metrics[t]) != 1 else ''}"
                            for t in table.tasks)
        text = f"Test metric: {columns}; {how}, {epoch}; Avg. is the mean of the task columns."
    if table.tune:
        by = f"validation {what}" if table.metric else "validation value of each task's metric"
        text += f" {', '.join(table.tune)} chosen per row and task by median {by}."
    seeds = sorted({c.seeds for c in table.cells.values()})
    failed = sum(e["failed"] for e in table.selection)
    text += f" Seeds per cell: {'/'.join(map(str, seeds))}."
    statuses = Counter(r.status for runs in table.members.values() for r in runs if r.status != "completed")
    if failed and set(statuses) - {"failed"}:  # e.g. diverged or preempted runs: say which
        parts = [f"{n} {status}" for status, n in sorted(statuses.items())]
        if failed > sum(statuses.values()):
            parts.append(f"{failed - sum(statuses.values())} without a finite validation {what}")
        text += f" {failed} run(s) left out ({', '.join(parts)}; listed in the selection CSV)."
    elif failed:
        text += f" {failed} failed run(s) left out (listed in the selection CSV)."
    if table.baselines:
        text += " Baselines (test): " + ", ".join(f"{t} {name} {display_scale(table.metrics[t]) * value:.1f}"
                                                  for t, (name, value) in sorted(table.baselines.items())) + "."
    return text


def to_markdown(table: Table) -> str:
    header, rows, best = table_cells(table)
    rows = [[f"**{c}**" if i in best.get(j, ()) else c for j, c in enumerate(row)] for i, row in enumerate(rows)]
    align = ["l"] + ["r"] * (len(header) - 1)
    return markdown_table(header, rows, align=align) + f"\n\n{caption(table)}\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "α": r"$\alpha$", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    header, rows, best = table_cells(table)
    spec = "l" + "r" * (len(header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        cells = [latex_escape(c) for c in row]
        cells = [rf"\textbf{{{c}}}" if i in best.get(j, ()) else c for j, c in enumerate(cells)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption(table))}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Raw numbers (not x100, not rounded): one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "trainable", "total", *[f"{t}_{table.metrics[t]}" for t in table.tasks],
                     *[f"{t}_seeds" for t in table.tasks], "average", "peak_memory_mb", "train_samples_per_s"])
    for row in table.rows:
        cells = [table.cells.get((row, t)) for t in table.tasks]
        memory, speed = table.efficiency[row]
        writer.writerow([row, *table.params[row], *[c.value if c else "" for c in cells],
                         *[c.seeds if c else 0 for c in cells], table.average(row), memory, speed])
    return buffer.getvalue()


def selection_csv(table: Table) -> str:
    """One line per entry; one validation/test column pair per metric the table shows."""
    buffer = io.StringIO()
    shown = list(dict.fromkeys(table.metrics[t] for t in table.tasks))
    keys = ["row", "task", *table.tune, "seeds", "failed",
            *[f"{split}_{m}" for m in shown for split in ("validation", "test")], "chosen"]
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for entry in table.selection:
        writer.writerow(entry)
    return buffer.getvalue()


# ---------------------------------------------------------------- command

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


def load_expected(path: Path) -> list[dict]:
    """Reference rows from a CSV: a ``method`` column, optionally ``trainable params``, then one
    column per task (the task names of the table, values x100)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "method" not in rows[0]:
        raise ConfigError("--expected", str(path), "needs a header with a 'method' column and task columns")
    return rows


def write_outputs(table: Table, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {f"{name}.md": to_markdown(table), f"{name}.tex": to_latex(table), f"{name}.csv": to_csv(table),
             f"{name}_selection.csv": selection_csv(table)}
    for file, text in files.items():
        write_text(out / file, text)
    return [out / f for f in files]


def log_to_wandb(table: Table, images: list[Path], project: str, name: str, directory: Path | None) -> None:
    """One W&B run of job type "analysis" holding the table (and plots); offline without an API key."""
    header, rows, _ = table_cells(table)
    tracker = Tracker.start({"metric": table.metric or "main metric", "metrics": table.metrics, "epoch": table.epoch,
                             "agg": table.agg, "tune": table.tune},
                            mode=os.environ.get("WANDB_MODE", "auto"), project=project, name=name,
                            job_type="analysis", directory=directory)
    tracker.log_table(name, header, rows)
    for image in images:
        tracker.log_image(image.stem, image)
    tracker.finish()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lora-lab-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of a W&B project")
    parser.add_argument("--wandb-group", help="only the W&B runs of this group (a sweep's name)")
    parser.add_argument("--metric", help="show this metric for every task (default: each task's main metric)")
    parser.add_argument("--epoch", choices=["best", "last"], default="best")
    parser.add_argument("--agg", choices=["median", "mean_std"], default="median")
    parser.add_argument("--tune", action="append", default=[], metavar="KEY",
                        help="a swept key chosen per row on validation, e.g. trainer.lr (repeatable)")
    parser.add_argument("--out", type=Path, help="write the table files here (default: the single run dir)")
    parser.add_argument("--name", default="table")
    parser.add_argument("--plot", action="store_true", help="also plot the metric vs parameters and vs rank")
    parser.add_argument("--expected", type=Path, help="CSV of reference rows (e.g. a paper's) shown below ours")
    parser.add_argument("--log-wandb", metavar="PROJECT", help="log the table (and plots) to this W&B project")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.runs, args.metric, args.epoch, args.wandb, args.wandb_group)
        table = build_table(runs, args.metric, args.epoch, args.agg, args.tune)
        if args.expected:
            table.expected = load_expected(args.expected)
    except (ConfigError, TableError) as error:
        print(f"tables: error: {error}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    out = args.out or (args.runs[0] if len(args.runs) == 1 else None)
    written, images = [], []
    if out is not None:
        written = write_outputs(table, out, args.name)
        if args.plot:
            images = [p for p in (plot_accuracy_vs_parameters(table, out / f"{args.name}_vs_params.png"),
                                  plot_accuracy_vs_rank(table, out / f"{args.name}_vs_rank.png")) if p]
        print("wrote " + ", ".join(str(p) for p in written + images))
    if args.log_wandb:
        log_to_wandb(table, images, args.log_wandb, args.name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
