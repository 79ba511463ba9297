"""The comparison table of a set of runs: method, trainable parameters, memory, speed, and the
task's metric on validation and test at the best epoch, and the run's folder.

    lora-lab-compare outputs/multirun/<hash>                  # a sweep's runs: the table, printed
    lora-lab-compare outputs/runs outputs/multirun/<hash>     # every single run, and a sweep's
    lora-lab-compare outputs/multirun/<hash> --out report.md  # printed and written to report.md

The metric is the main metric the records' task declares (records written before tasks declared one:
trainer.monitor, else accuracy); ``--metric`` shows another one the records have. Runs of several
tasks give one table per task, under a "### <task>" heading. The note under a table gives the task's
baseline on test (e.g. the majority class, or all "O" for token classification).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

from lora_lab.analysis.runs import main_metric, record_baseline, record_task
from lora_lab.errors import ConfigError
from lora_lab.markdown import markdown_table
from lora_lab.methods import describe_method
from lora_lab.runtime.records import RECORD_FILE, find_run_dirs, load_record, write_text

COLUMNS = ["method", "seed", "trainable params", "% of total", "peak memory (MB)", "train samples/s",
           "val {m}", "test {m}", "epoch", "run", "failed"]


def method_label(config: dict, resolved: dict | None = None) -> str:
    """A row name: the method and its size, as the method itself describes it. ``resolved`` (a
    record's ``method_resolved``) gives the settings chosen at run time, e.g. a budget's rank."""
    return describe_method(config.get("method"), resolved).label()


def _fmt(value, spec: str) -> str:
    """A number as ``spec`` formats it; "-" when the record has none."""
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _metric(record: dict, split: str, metric: str) -> str:
    value = record["best"].get(f"{split}/{metric}")
    if value is None:
        raise ConfigError("record", str(Path(record["run_dir"]) / RECORD_FILE),
                          f"has no {split}/{metric} in 'best' (have: "
                          f"{sorted(k for k in record['best'] if k.startswith(split + '/'))})")
    return _fmt(value, ".4f")


def comparison_row(record: dict, metric: str | None = None) -> list:
    """One row of the table; a run that did not complete shows its status and first error line.
    ``metric`` None: the record's main metric."""
    metric = metric or main_metric(record)
    config = record.get("config") or {}
    label = method_label(config, record.get("method_resolved"))
    run = Path(record["run_dir"]).name if record.get("run_dir") else ""
    if record.get("status") != "completed":
        error = str(record.get("error") or "").strip()
        error = error.splitlines()[0] if error else "no error recorded"
        status = f"{record.get('status')}: {error}"[:100].replace("|", "\\|")  # one cell of a Markdown table
        return [label, config.get("seed", ""), "", "", "", "", "", "", "", run, status]
    p, meas, best = record["parameters"], record["measurements"], record["best"]
    percent = p.get("trainable_percent")
    if percent is None and p["total"]:
        percent = 100 * p["trainable"] / p["total"]
    return [label, config.get("seed", ""), f"{p['trainable']:,}", _fmt(percent, ".2f"),
            _fmt(meas.get("peak_memory_mb"), ".0f"), _fmt(meas.get("train_samples_per_s"), ".1f"),
            _metric(record, "validation", metric), _metric(record, "test", metric), str(best["epoch"]), run, ""]


def comparison_rows(run_dirs: list[Path], metric: str | None = None) -> list[list]:
    return [comparison_row(load_record(d, require_completed=False), metric) for d in run_dirs]


def _names_task(record: dict) -> bool:
    task, data = record.get("task"), (record.get("config") or {}).get("data")
    return bool((isinstance(task, dict) and task.get("name"))
                or (isinstance(data, dict) and (data.get("subset") or data.get("name"))))


def by_task(records: list[dict]) -> dict[str, list[dict]]:
    """The records of each task, in input order, tasks sorted by name. A run that stopped before its
    config named the task joins the only task there is."""
    named = [record_task(r) if _names_task(r) else None for r in records]
    known = sorted({t for t in named if t is not None})
    tasks = [t or (known[0] if len(known) == 1 else record_task(r)) for t, r in zip(named, records)]
    return {task: [r for r, t in zip(records, tasks) if t == task] for task in sorted(set(tasks))}


def task_metric(task: str, records: list[dict]) -> str:
    """The main metric of a task's records; records that disagree on it are refused."""
    declared = [(r, main_metric(r)) for r in records
                if r.get("status") == "completed" or (isinstance(r.get("task"), dict) and r["task"].get("main_metric"))]
    for record, metric in declared[1:]:
        if metric != declared[0][1]:
            raise ConfigError("record", str(Path(record["run_dir"]) / RECORD_FILE),
                              f"has main metric {metric}, other runs of {task} have {declared[0][1]}; "
                              "pass --metric to choose one")
    return declared[0][1] if declared else main_metric(records[0])


def baseline_note(records: list[dict], metric: str) -> str:
    """The task's baseline on test in ``metric``: the records' "baseline" (median over them), else,
    for records written before it, their majority-class accuracy; empty when they have neither."""
    done = [r for r in records if r.get("status") == "completed"]
    found = [b for b in (record_baseline(r, metric) for r in done) if b is not None]
    if found:
        name = Counter(n for n, _ in found).most_common(1)[0][0]
        value = statistics.median(v for _, v in found)
        if name == "majority class" and metric == "accuracy":
            return f"Majority class (test): {value:.4f}."
        return f"Baseline (test, {name}): {metric} {value:.4f}."
    majority = next((r.get("majority_class_test_accuracy") for r in done), None)
    return f"Majority class (test): {majority:.4f}." if isinstance(majority, (int, float)) and majority else ""


def comparison_table(records: list[dict], metric: str) -> str:
    """The table of one task's records and, when they have a baseline, the note under it."""
    rows = [comparison_row(record, metric) for record in records]
    columns = [c.format(m=metric) for c in COLUMNS]
    if not any(r[-1] for r in rows):
        columns, rows = columns[:-1], [r[:-1] for r in rows]
    note = baseline_note(records, metric)
    note = f"\n{note} Metric: {metric}, best epoch on validation.\n" if note else ""
    return markdown_table(columns, rows) + "\n" + note


def comparison_text(*roots: Path, metric: str | None = None) -> str:
    """The comparison of every run under ``roots``, each record checked (``load_record``: a corrupt
    or incomplete one is refused, naming the file); runs that did not complete are listed with their
    status and error. One table per task, in ``metric`` or (None) the task's main metric."""
    run_dirs = find_run_dirs(*roots)
    if not run_dirs:
        raise ConfigError("runs", [str(r) for r in roots], f"contain no {RECORD_FILE}")
    records = [load_record(d, require_completed=False) for d in run_dirs]
    tasks = by_task(records)
    parts = []
    for task, task_records in tasks.items():
        table = comparison_table(task_records, metric or task_metric(task, task_records))
        parts.append(table if len(tasks) == 1 else f"### {task}\n\n{table}")
    return "\n".join(parts)


def write_comparison(*roots: Path, metric: str | None = None) -> str:
    """``comparison_text``, also written to <root>/comparison.md when there is one root (what a
    multirun leaves in its sweep folder)."""
    text = comparison_text(*roots, metric=metric)
    if len(roots) == 1:
        write_text(Path(roots[0]) / "comparison.md", text)
    return text


PROG = "lora-lab-compare"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--metric", help="a metric the records have (default: each task's main metric)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file (default: print only)")
    args = parser.parse_args(argv)
    try:
        text = comparison_text(*args.runs, metric=args.metric)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(text)
    if args.out is not None:
        try:
            write_text(args.out, text)
        except OSError as error:  # e.g. a folder that does not exist, or is not writable
            print(f"{PROG}: error: --out={args.out}: {error.strerror or error}", file=sys.stderr)
            return 2
        print(f"{PROG}: written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
