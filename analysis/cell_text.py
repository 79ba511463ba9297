"""How a table writes a cell: the median (or mean ± std) x100 and, when the table has statistics,
a dagger for fewer than 3 seeds, a section mark for a seeds-only interval in a table that also has
two-level ones, and the interval ``[low, high]``; a paired difference with its p-value."""
from __future__ import annotations

import math

from lora_lab.analysis.table_build import Cell, Table
from lora_lab.analysis.table_stats import AVERAGE
from lora_lab.tasks.metrics import display_scale

FEW_SEEDS = 3  # cells with fewer seeds get DAGGER
DAGGER, SEEDS_ONLY = "†", "§"


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


def interval_text(bounds: tuple | None, scale: float) -> str:
    return "" if bounds is None or bounds[0] is None else f" [{scale * bounds[0]:.1f}, {scale * bounds[1]:.1f}]"


def scale_of(table: Table, column: str) -> float:
    return display_scale(table.metrics[table.tasks[0] if column == AVERAGE else column])


def mixed(table: Table) -> bool:
    """Whether some cells resampled test examples and others only seeds."""
    return len(set(table.stats.examples.values())) > 1 if table.stats else False


def value_text(table: Table, row: str, column: str) -> str:
    """A task's cell or a row's Avg. as the table shows it."""
    scale, stats = scale_of(table, column), table.stats
    if column == AVERAGE:
        value = table.average(row)
        if not math.isfinite(value):
            return "-"
        text, cells = f"{scale * value:.1f}", [table.cells[(row, t)] for t in table.tasks]
        keys = [(row, t) for t in table.tasks]
    else:
        cell = table.cells.get((row, column))
        text, cells, keys = format_cell(cell, table.agg, scale), [cell], [(row, column)]
        if cell is None or not math.isfinite(cell.value):
            return text
    if stats is None:
        return text
    if min(c.seeds for c in cells) < FEW_SEEDS:
        text += DAGGER
    if mixed(table) and not all(stats.examples.get(k) for k in keys):
        text += SEEDS_ONLY
    return text + interval_text(stats.intervals.get((row, column)), scale)


def _p_text(p: float | None) -> str:
    if p is None:
        return ""
    return " p<0.001" if p < 0.001 else f" p={p:.3f}"


def comparison_text(table: Table, row: str, task: str) -> str:
    stats, scale = table.stats, scale_of(table, task)
    if row == stats.reference:
        return "ref."
    found = stats.comparisons.get((row, task))
    if found is None:
        return "-"
    text = f"{scale * found.difference:+.1f}{interval_text((found.low, found.high), scale)}{_p_text(found.p)}"
    return text + (" (unpaired)" if found.units == "unpaired" else "")
