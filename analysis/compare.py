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


def comparison_rows(run_dirs: list[Path], metric: str = "accuracy") -> list[list]:
    rows = []
    for run_dir in run_dirs:
        record = load_record(run_dir, require_completed=False)
        config = record.get("config", {})
        if record.get("status") != "completed":
            rows.append([method_label(config, record.get("method_resolved")), config.get("seed", ""), "", "", "", "", "", "", "",
                         record.get("error", "failed")[:100]])
            continue
        p, meas, best = record["parameters"], record["measurements"], record["best"]
        rows.append([
            method_label(config, record.get("method_resolved")), config.get("seed", ""),
            f"{p['trainable']:,}", f"{p['trainable_percent']:.2f}", f"{meas['peak_memory_mb']:.0f}",
            f"{meas['train_samples_per_s']:.1f}", f"{best[f'validation/{metric}']:.4f}",
            f"{best[f'test/{metric}']:.4f}", str(best["epoch"]), "",
        ])
    return rows


def write_comparison(*roots: Path, metric: str = "accuracy") -> str:
    run_dirs = find_run_dirs(*roots)
    if not run_dirs:
        raise ConfigError("runs", [str(r) for r in roots], f"contain no {RECORD_FILE}")
    rows = comparison_rows(run_dirs, metric)
    columns = [c.format(m=metric) for c in COLUMNS]
    if not any(r[-1] for r in rows):
        columns, rows = columns[:-1], [r[:-1] for r in rows]
    table = markdown_table(columns, rows)
    first = load_record(run_dirs[0], require_completed=False)
    majority = first.get("majority_class_test_accuracy")
    note = f"\nMajority class (test): {majority:.4f}. Metric: {metric}, best epoch on validation.\n" if majority else ""
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
