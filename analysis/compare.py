"""The comparison table of a set of runs: method, trainable parameters, memory, speed, accuracy.

    lora-lab-compare outputs/compare/2026-11-22_20-00-00 [more dirs] [--metric accuracy]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_lab.errors import ConfigError
from lora_lab.markdown import markdown_table
from lora_lab.methods import describe_method
from lora_lab.records import RECORD_FILE, find_run_dirs, load_record, write_text

COLUMNS = ["method", "seed", "trainable params", "% of total", "peak memory (MB)", "train samples/s",
           "val {m}", "test {m}", "epoch", "failed"]


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


def comparison_row(record: dict, metric: str = "accuracy") -> list:
    """One row of the table; a run that did not complete shows its status and first error line."""
    config = record.get("config") or {}
    label = method_label(config, record.get("method_resolved"))
    if record.get("status") != "completed":
        error = str(record.get("error") or "").strip()
        error = error.splitlines()[0] if error else "no error recorded"
        status = f"{record.get('status')}: {error}"[:100].replace("|", "\\|")  # one cell of a Markdown table
        return [label, config.get("seed", ""), "", "", "", "", "", "", "", status]
    p, meas, best = record["parameters"], record["measurements"], record["best"]
    percent = p.get("trainable_percent")
    if percent is None and p["total"]:
        percent = 100 * p["trainable"] / p["total"]
    return [label, config.get("seed", ""), f"{p['trainable']:,}", _fmt(percent, ".2f"),
            _fmt(meas.get("peak_memory_mb"), ".0f"), _fmt(meas.get("train_samples_per_s"), ".1f"),
            _metric(record, "validation", metric), _metric(record, "test", metric), str(best["epoch"]), ""]


def comparison_rows(run_dirs: list[Path], metric: str = "accuracy") -> list[list]:
    return [comparison_row(load_record(d, require_completed=False), metric) for d in run_dirs]


def write_comparison(*roots: Path, metric: str = "accuracy") -> str:
    """The comparison of every run under ``roots``, each record checked (``load_record``: a corrupt
    or incomplete one is refused, naming the file); runs that did not complete are listed with their
    status and error. Written to <root>/comparison.md when there is one root."""
    run_dirs = find_run_dirs(*roots)
    if not run_dirs:
        raise ConfigError("runs", [str(r) for r in roots], f"contain no {RECORD_FILE}")
    records = [load_record(d, require_completed=False) for d in run_dirs]
    rows = [comparison_row(record, metric) for record in records]
    columns = [c.format(m=metric) for c in COLUMNS]
    if not any(r[-1] for r in rows):
        columns, rows = columns[:-1], [r[:-1] for r in rows]
    table = markdown_table(columns, rows)
    majority = next((r.get("majority_class_test_accuracy") for r in records if r.get("status") == "completed"), None)
    note = (f"\nMajority class (test): {majority:.4f}. Metric: {metric}, best epoch on validation.\n"
            if isinstance(majority, (int, float)) and majority else "")
    text = table + "\n" + note
    if len(roots) == 1:
        write_text(Path(roots[0]) / "comparison.md", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1", "mcc"])
    args = parser.parse_args(argv)
    try:
        print(write_comparison(*args.runs, metric=args.metric))
    except ConfigError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
