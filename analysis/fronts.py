"""Cost fronts of a table: which rows no other row beats at a lower cost.

A row's score is its cell (one task) or its Avg. (several tasks of one direction); its costs are the
trainable parameters, the peak memory of training and the training time per example (1 / the
training throughput, in ms), each the median over the row's chosen runs. A row is dominated on a cost
when another row costs no more and scores no worse, and is strictly better in one of the two; the
others form the Pareto front. Point values (medians) decide, not their intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lora_lab.tasks.metrics import higher_is_better


@dataclass(frozen=True)
class Cost:
    key: str
    label: str      # table header
    axis: str       # plot axis
    log: bool       # plotted on a log axis


COSTS = (Cost("params", "Trainable params", "trainable parameters (log scale)", True),
         Cost("memory", "Peak memory (MB)", "peak training memory (MB)", False),
         Cost("time", "Train ms/example", "training time per example (ms)", True))


def score_direction(table) -> bool | None:
    """Whether higher scores are better for the table's score; None when its tasks disagree."""
    directions = {higher_is_better(table.metrics[t]) for t in table.tasks}
    return directions.pop() if len(directions) == 1 else None


def score(table, row: str) -> float:
    """The row's Avg. (several tasks) or its one cell."""
    if len(table.tasks) > 1:
        return table.average(row)
    cell = table.cells.get((row, table.tasks[0]))
    return cell.value if cell is not None else math.nan


def cost(table, row: str, key: str) -> float | None:
    if key == "params":
        return table.params[row][0]
    memory, speed = table.efficiency[row]
    if key == "memory":
        return memory
    return 1000 / speed if speed else None


def _usable(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def front(table, key: str) -> dict[str, str | None]:
    """Per row placed on this cost: None when it is on the front, else the row dominating it (of those,
    the cheapest). Rows without a score or that cost are left out."""
    higher = score_direction(table)
    if higher is None:
        return {}
    points = {row: (cost(table, row, key), score(table, row)) for row in table.rows}
    points = {row: (c, s) for row, (c, s) in points.items() if _usable(c) and math.isfinite(s)}
    out = {}
    for row, (c, s) in points.items():
        better = [(oc, other) for other, (oc, os) in points.items() if other != row and oc <= c
                  and (os >= s if higher else os <= s) and (oc < c or os != s)]
        out[row] = min(better)[1] if better else None
    return out


def fronts(table) -> dict[str, dict[str, str | None]]:
    return {c.key: front(table, c.key) for c in COSTS}
