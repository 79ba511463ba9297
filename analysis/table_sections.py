"""The small tables under a table's main one, when it has statistics: the ranking's stability, tuned
vs default learning rate, and the cost fronts; each as (title, header, rows, caption)."""
from __future__ import annotations

from lora_lab.analysis.cell_text import DAGGER, FEW_SEEDS, human_count, interval_text, scale_of, value_text
from lora_lab.analysis.fronts import COSTS, cost, fronts
from lora_lab.analysis.table_build import Table
from lora_lab.analysis.table_stats import AVERAGE, DEFAULTS


def ranking_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    ranking = table.stats.ranking
    header, rows = ["Method"], []
    for column in ranking:
        header += [f"{column} P(1st)", f"{column} mean rank"]
    for row in table.rows:
        line = [row]
        for found in ranking.values():
            line += [f"{found[row][0]:.2f}", f"{found[row][1]:.1f}"] if row in found else ["-", "-"]
        rows.append(line)
    return header, rows


def ranking_caption(table: Table) -> str:
    return (f"Ranking stability: over {table.stats.resamples} bootstrap resamples of every row (the cells' "
            "resampling; rows with the same seeds and test examples share the draws), the share in which the row "
            "ranks first (ties share it) and its mean rank.")


def _lr(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def defaults_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    header = ["Method"]
    for task in table.tasks:
        header += [f"{task} tuned", f"{task} default"]
    key = next(k for k in table.tune if k in DEFAULTS)
    rows = []
    for row in table.rows:
        line = [row]
        for task in table.tasks:
            cell = table.cells.get((row, task))
            if (row, task) not in table.stats.defaults:
                line += ["-", "-"]
                continue
            line.append(f"{value_text(table, row, task)} (lr {_lr(cell.chosen.get(key))})")
            default, score = table.stats.defaults[(row, task)]
            scale = scale_of(table, task)
            line.append(f"not run (lr {_lr(default)})" if score is None else
                        f"{scale * score.value:.1f}{DAGGER if score.seeds < FEW_SEEDS else ''}"
                        f"{interval_text((score.low, score.high), scale)} (lr {_lr(default)})")
        rows.append(line)
    return header, rows


def defaults_caption(table: Table) -> str:
    return ("Tuned vs default: the cell at the learning rate chosen on validation, and the same row's test "
            f"{'median' if table.agg == 'median' else 'mean'} at its method's default learning rate (method.lr, "
            "as configured), with its interval; not run: the sweep did not try the default.")


def fronts_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    found = fronts(table)
    header = ["Method", "Avg." if len(table.tasks) > 1 else table.column(table.tasks[0])]
    for c in COSTS:
        header += [c.label, "front"]
    rows = []
    for row in table.rows:
        line = [row, value_text(table, row, AVERAGE if len(table.tasks) > 1 else table.tasks[0])]
        for c in COSTS:
            value = cost(table, row, c.key)
            line.append("-" if not value else human_count(value) if c.key == "params"
                        else f"{value:.0f}" if c.key == "memory" else f"{value:.1f}")
            placed = found[c.key]
            line.append("-" if row not in placed else "yes" if placed[row] is None else f"dominated by {placed[row]}")
        rows.append(line)
    return header, rows


def fronts_caption(table: Table) -> str:
    return ("Cost fronts: per cost (trainable parameters; peak training memory; training time per example, "
            "1000 / train samples/s), the rows that no other row beats at no higher cost (front: yes); a dominated "
            "row names the cheapest row that costs no more and scores at least as well. Medians decide, not their "
            "intervals.")


def sections(table: Table) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The small tables shown below the main one: (title, header, rows, caption)."""
    if table.stats is None:
        return []
    out = []
    if table.stats.ranking:
        out.append(("Ranking stability", *ranking_rows(table), ranking_caption(table)))
    if table.stats.defaults:
        out.append(("Tuned vs default learning rate", *defaults_rows(table), defaults_caption(table)))
    if max(len(placed) for placed in fronts(table).values()) > 1:
        out.append(("Cost fronts", *fronts_rows(table), fronts_caption(table)))
    return out
