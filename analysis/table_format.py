"""A table as Markdown, LaTeX (booktabs) and CSV, with its caption.

Without statistics (``table.stats`` None) a cell is the median (or mean ± std) x100 and each column's
best value is bold. With them (``table_stats.add_statistics``, what ``lora-lab-table`` does) a cell
also carries its interval, ``74.3 [71.0, 75.3]``, a dagger when fewer than 3 seeds are behind it, and
bold marks a column's best only when it is separated from the runner-up; the caption says how the
intervals were made and which columns are tied, and Markdown and LaTeX add the ranking's stability,
the tuned-vs-default scores (``--tune trainer.lr``) and the cost fronts.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter

from lora_lab.analysis.cell_text import (
    DAGGER,
    FEW_SEEDS,
    SEEDS_ONLY,
    comparison_text,
    human_count,
    interval_text,
    scale_of,
    value_text,
)
from lora_lab.analysis.table_build import Table
from lora_lab.analysis.table_sections import sections
from lora_lab.analysis.table_stats import AVERAGE
from lora_lab.markdown import markdown_table
from lora_lab.tasks.metrics import display_scale, higher_is_better, metric_name


def _columns(table: Table) -> list[str]:
    return list(table.tasks) + ([AVERAGE] if len(table.tasks) > 1 else [])


def table_cells(table: Table) -> tuple[list[str], list[list[str]], dict]:
    """Header, formatted rows and, per value column, the indices of the rows shown in bold."""
    stats, columns = table.stats, _columns(table)
    reference = stats.reference if stats else None
    header = ["Method", "Trainable params", "% of total", *[table.column(t) for t in table.tasks]]
    if len(table.tasks) > 1:
        header.append("Avg.")
    if reference:
        header += [f"Δ vs {reference}"] if len(table.tasks) == 1 else [f"Δ {t}" for t in table.tasks]
    header += ["Peak memory (MB)", "Train samples/s"]
    if table.tune and len(table.tasks) == 1:
        header += [f"chosen {k}" for k in table.tune]
    rows = []
    for row in table.rows:
        trainable, total = table.params[row]
        percent = f"{100 * trainable / total:.2f}" if trainable is not None and total else "-"
        line = [row, human_count(trainable), percent, *[value_text(table, row, c) for c in columns]]
        if reference:
            line += [comparison_text(table, row, t) for t in table.tasks]
        memory, speed = table.efficiency[row]
        line += [f"{memory:.0f}" if memory else "-", f"{speed:.1f}" if speed else "-"]
        if table.tune and len(table.tasks) == 1:
            cell = table.cells.get((row, table.tasks[0]))
            line += [f"{cell.chosen.get(k):g}" if cell and isinstance(cell.chosen.get(k), float)
                     else str(cell.chosen.get(k, "-") if cell else "-") for k in table.tune]
        rows.append(line)
    if stats is None:
        # each task column's best is its metric's; Avg. has one only when every column agrees on the direction
        directions = {3 + i: higher_is_better(table.metrics[t]) for i, t in enumerate(table.tasks)}
        if len(table.tasks) > 1 and len(set(directions.values())) == 1:
            directions[3 + len(table.tasks)] = next(iter(directions.values()))
        best = _best_rows(rows, directions)
    else:  # bold only a best value separated from the runner-up
        best = {3 + i: {table.rows.index(stats.separation[c].best)} for i, c in enumerate(columns)
                if c in stats.separation and stats.separation[c].separated}
    for reference_row in table.expected:  # after the best values are found: only our runs are bolded
        values = [reference_row.get(task) for task in table.tasks]
        line = [reference_row["method"], reference_row.get("trainable params") or "-", "-"]
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
    return text + (statistics_caption(table) if table.stats else "")


def statistics_caption(table: Table) -> str:
    stats = table.stats
    level, centre = f"{100 * stats.level:g} %", "median" if table.agg == "median" else "mean"
    resampled = set(stats.examples.values())
    if resampled == {True}:
        how = "a two-level bootstrap over seeds and test examples (both drawn with replacement in each resample)"
    elif resampled == {False}:
        how = "a bootstrap over seeds only (the records hold no per-example test results)"
    else:
        how = (f"a two-level bootstrap over seeds and test examples, over seeds only in the cells marked "
               f"{SEEDS_ONLY} (runs without per-example test results)")
    cells = [(k, c) for k, c in table.cells.items() if math.isfinite(c.value)]
    if not stats.intervals:
        text = " No intervals: every cell has one seed and no per-example test results."
    else:
        text = (f" [low, high]: the {level} interval of the {centre}, by {how}; scipy.stats.bootstrap, percentile, "
                f"{stats.resamples} resamples, seed {stats.seed}.")
        if any(k not in stats.intervals for k, _ in cells):
            text += " No interval: one seed without per-example test results."
    if any(c.seeds < FEW_SEEDS for _, c in cells):
        text += f" {DAGGER} fewer than {FEW_SEEDS} seeds."
    text += " Bold: a column's best, only when the interval of its paired difference to the runner-up excludes 0."
    tied = [f"{column} ({s.best} vs {s.runner_up}, {scale_of(table, column) * s.difference:+.1f}"
            f"{interval_text((s.low, s.high), scale_of(table, column))})"
            for column, s in table.stats.separation.items() if not s.separated]
    if tied:
        text += " Tied: " + "; ".join(tied) + "."
    if stats.reference:
        units = {c.units for c in stats.comparisons.values()}
        text += (f" Δ: the row minus {stats.reference}, with the {level} interval of a paired bootstrap over "
                 "their common seeds (and test examples when both have per-example results); p: two-sided paired "
                 "permutation test (scipy.stats.permutation_test, permutation_type='samples'), each unit's two "
                 "results swapped at random, a unit being a (seed, test example) pair when both rows have "
                 "per-example results, else a seed (exact then, and never below 0.25 with 3 seeds).")
        if "seeds and test examples" in units:
            text += (" The test holds the seeds fixed, the interval resamples them too: a small p with an interval "
                     "that includes 0 is a gap these runs show on the test set but that the seeds' spread leaves open.")
        if "unpaired" in units:
            text += " (unpaired): no common seed, intervals resampled independently and no test."
    return text


def to_markdown(table: Table) -> str:
    header, rows, best = table_cells(table)
    rows = [[f"**{c}**" if i in best.get(j, ()) else c for j, c in enumerate(row)] for i, row in enumerate(rows)]
    align = ["l"] + ["r"] * (len(header) - 1)
    text = markdown_table(header, rows, align=align) + f"\n\n{caption(table)}\n"
    for title, header, rows, note in sections(table):
        text += f"\n### {title}\n\n" + markdown_table(header, rows, align=["l"] + ["r"] * (len(header) - 1))
        text += f"\n\n{note}\n"
    return text


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "α": r"$\alpha$", "±": r"$\pm$", "†": r"$^\dagger$", "§": r"\S{}", "Δ": r"$\Delta$",
                 "<": r"$<$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def _latex_table(header: list[str], rows: list[list[str]], note: str, best: dict | None = None) -> list[str]:
    spec = "l" + "r" * (len(header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        cells = [latex_escape(c) for c in row]
        cells = [rf"\textbf{{{c}}}" if i in (best or {}).get(j, ()) else c for j, c in enumerate(cells)]
        lines.append(" & ".join(cells) + r" \\")
    return lines + [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(note)}}}", r"\end{table}"]


def to_latex(table: Table) -> str:
    header, rows, best = table_cells(table)
    lines = _latex_table(header, rows, caption(table), best)
    for _, header, rows, note in sections(table):
        lines += [""] + _latex_table(header, rows, note)
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Raw numbers (not x100, not rounded): one line per row. With statistics, after the columns of a
    table without them: each task's and the average's interval, how the task's cell was resampled,
    and with a reference row the difference to it, its interval and p-value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stats, columns = table.stats, [f"{t}_{table.metrics[t]}" for t in table.tasks]
    header = ["method", "trainable", "total", *columns, *[f"{t}_seeds" for t in table.tasks], "average",
              "peak_memory_mb", "train_samples_per_s"]
    if stats:
        header += [f"{c}_{end}" for c in columns + ["average"] for end in ("low", "high")]
        header += [f"{t}_resampled" for t in table.tasks]
        if stats.reference:
            header += [f"{t}_vs_reference_{what}" for t in table.tasks for what in ("diff", "low", "high", "p")]
    writer.writerow(header)
    for row in table.rows:
        cells = [table.cells.get((row, t)) for t in table.tasks]
        memory, speed = table.efficiency[row]
        line = [row, *table.params[row], *[c.value if c else "" for c in cells],
                *[c.seeds if c else 0 for c in cells], table.average(row), memory, speed]
        if stats:
            for column in [*table.tasks, AVERAGE]:
                line += list(stats.intervals.get((row, column), ("", "")))
            line += [("" if (row, t) not in stats.examples else "seeds+examples" if stats.examples[(row, t)]
                      else "seeds") for t in table.tasks]
            if stats.reference:
                for t in table.tasks:
                    found = stats.comparisons.get((row, t))
                    line += [found.difference, found.low, found.high, found.p] if found else ["", "", "", ""]
        writer.writerow(["" if v is None else v for v in line])
    return buffer.getvalue()


def selection_csv(table: Table) -> str:
    """One line per entry; one validation/test column pair per metric the table shows; the folders of
    the runs behind it (space-separated)."""
    buffer = io.StringIO()
    shown = list(dict.fromkeys(table.metrics[t] for t in table.tasks))
    keys = ["row", "task", *table.tune, "seeds", "failed",
            *[f"{split}_{m}" for m in shown for split in ("validation", "test")], "chosen", "runs"]
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for entry in table.selection:
        writer.writerow(entry)
    return buffer.getvalue()
