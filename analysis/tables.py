"""Paper-style tables from run records: one row per method and size, one column per task.

    lora-lab-table outputs/multirun/<hash> --tune trainer.lr --out report/
    lora-lab-table outputs/multirun/<hash> outputs/runs --epoch last --agg mean_std
    lora-lab-table outputs/multirun/<hash> --compare-to "Full FT" --seed 1
    lora-lab-table outputs/multirun/<hash> --by trainer.lr   # a row per learning rate
    lora-lab-table --wandb my-team/lora_lab --wandb-group <hash> --out report/

Each cell is the median over seeds (or mean ± std) of the test metric at the best epoch (chosen on
validation) or the last epoch, with its 95 % bootstrap interval: over seeds and, when the runs saved
their per-example test results (predictions.safetensors), over test examples too. A dagger marks
cells with fewer than 3 seeds. The metric of a column is its task's main metric, as the records
declare it (``task.main_metric``; records written before tasks declared one: ``trainer.monitor``,
else accuracy), so one table may show accuracy for one task and entity F1 for another: the header
then names each column's metric, the caption lists them and "Avg." is the mean of the columns, as in
GLUE tables. ``--metric NAME`` shows NAME for every task instead. With ``--tune KEY`` (e.g.
trainer.lr) the runs of a row are split by that key's value, the value with the best median
validation metric (the task's own; best is lowest for perplexity and loss, highest for the others)
is chosen per row and task, and the cell reports test at that value: the fair protocol in which
every method gets the same grid; with trainer.lr a second table gives each row's score at its
method's default learning rate. Runs of one method and task that differ in a model or data setting
(e.g. model.name, data.max_train) are rows of their own, labelled with those values
("LoRA r=8 α=8 (q+v), max_train=64"), and so are runs that differ in a key given with ``--by KEY``.
Runs of one row that differ in any other setting are an error naming two of them, so seeds are never
mixed across configurations by accident; so are runs of one task that declare different main
metrics. Bold marks a column's best value when the interval of its paired difference to the
runner-up excludes 0; the caption names the tied columns. ``--compare-to ROW`` adds each
row's difference to ROW per task, its interval and a paired permutation test's p-value. Below the
table: how often each row ranks first over the bootstrap resamples, and the cost fronts (metric vs
trainable parameters, peak memory, training time per example). ``--seed`` fixes every draw.

Writes <name>.md, <name>.tex (booktabs), <name>.csv (``<task>_<metric>`` and ``<task>_seeds`` per
task, then the intervals) and <name>_selection.csv (every configuration with its seed count and
validation/test medians: one ``validation_<metric>``, ``test_<metric>`` column pair per metric the
table shows, filled for the entries of the tasks shown in that metric and empty for the others); with
``--plot`` also the cost fronts (<name>_vs_params.png), the metric vs LoRA rank and, with --tune
trainer.lr, vs learning rate. When the records carry a baseline (e.g. the majority class, or all "O"
for token classification), the caption gives its test value per task.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from lora_lab.analysis.runs import (
    Run,
    collect_runs,
    main_metric,
    record_baseline,
    record_from_wandb,
    record_task,
    run_from_record,
)
from lora_lab.analysis.statistics import RESAMPLES
from lora_lab.analysis.table_build import Table, TableError, build_table
from lora_lab.analysis.table_format import selection_csv, table_cells, to_csv, to_latex, to_markdown
from lora_lab.analysis.table_plots import plot_accuracy_vs_lr, plot_accuracy_vs_parameters, plot_accuracy_vs_rank
from lora_lab.analysis.table_stats import add_statistics
from lora_lab.errors import ConfigError
from lora_lab.runtime.phases import Phases
from lora_lab.runtime.records import write_text
from lora_lab.runtime.tracking import Tracker

__all__ = ["Run", "Table", "TableError", "build_table", "collect_runs", "main", "main_metric", "record_baseline",
           "record_from_wandb", "record_task", "run_from_record", "to_csv", "to_latex", "to_markdown"]


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
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="a key whose values give rows of their own, e.g. trainer.weight_decay (repeatable)")
    parser.add_argument("--out", type=Path, help="write the table files here (default: the single run dir)")
    parser.add_argument("--name", default="table")
    parser.add_argument("--plot", action="store_true",
                        help="also plot the cost fronts, the metric vs LoRA rank and (--tune trainer.lr) vs lr")
    parser.add_argument("--expected", type=Path, help="CSV of reference rows (e.g. a paper's) shown below ours")
    parser.add_argument("--log-wandb", metavar="PROJECT", help="log the table (and plots) to this W&B project")
    parser.add_argument("--compare-to", metavar="ROW", help="add each row's paired difference to this row "
                        "(its label or a unique prefix, e.g. 'Full FT') per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of every bootstrap and permutation draw")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples and permutations")
    args = parser.parse_args(argv)
    phases = Phases(prefix="[lora-lab-table]", to_stderr=True)  # stdout is the table
    try:
        with phases.phase("reading the runs"):
            runs = collect_runs(args.runs, args.metric, args.epoch, args.wandb, args.wandb_group)
        table = build_table(runs, args.metric, args.epoch, args.agg, args.tune, args.by)
        if args.expected:
            table.expected = load_expected(args.expected)
        with phases.phase(f"intervals, paired tests and ranking ({args.resamples:,} resamples)"):
            add_statistics(table, args.seed, args.resamples, compare_to=args.compare_to, curves=args.plot)
    except (ConfigError, TableError) as error:
        print(f"lora-lab-table: error: {error}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    out = args.out or (args.runs[0] if len(args.runs) == 1 else None)
    written, images = [], []
    if out is not None:
        written = write_outputs(table, out, args.name)
        if args.plot:
            with phases.phase("plotting"):
                images = [p for p in (plot_accuracy_vs_parameters(table, out / f"{args.name}_vs_params.png"),
                                      plot_accuracy_vs_rank(table, out / f"{args.name}_vs_rank.png"),
                                      plot_accuracy_vs_lr(table, out / f"{args.name}_vs_lr.png")) if p]
        print("wrote " + ", ".join(str(p) for p in written + images))
    if args.log_wandb:
        log_to_wandb(table, images, args.log_wandb, args.name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
