"""What a table says about how sure it is (``add_statistics``): a 95 % interval for every cell and for
Avg., whether each column's best is separated from its runner-up, the ranking's stability, with
``--compare-to ROW`` each row's paired difference to ROW and its p-value, and with ``--tune
trainer.lr`` the score at each method's default learning rate and the metric at every learning rate
tried. The numbers come from lora_lab.analysis.statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lora_lab.analysis.example_metrics import check_against, supports
from lora_lab.analysis.runs import lookup
from lora_lab.analysis.statistics import (
    LEVEL,
    RESAMPLES,
    Resampled,
    Sample,
    cell_resampled,
    combine,
    difference,
    interval,
    joint_distributions,
    pairing,
    rank_stability,
)
from lora_lab.analysis.table_build import Table, TableError
from lora_lab.tasks.metrics import higher_is_better

AVERAGE = "Avg."
DEFAULTS = {"trainer.lr": "method.lr"}  # a tuned key -> where a run's config holds its method's default


@dataclass
class Separation:
    """A column's best row and its runner-up: the interval of best - runner-up, and whether it excludes 0."""
    best: str
    runner_up: str | None
    separated: bool
    difference: float = math.nan
    low: float | None = None
    high: float | None = None


@dataclass
class Comparison:
    """A row minus the reference row in one task: difference, its interval, p-value, what was paired."""
    difference: float
    low: float | None
    high: float | None
    p: float | None
    units: str  # "seeds and test examples", "seeds", or "unpaired"


@dataclass
class Score:
    """A row's test score at one tuned value: median (or mean), interval, seeds."""
    value: float
    low: float | None
    high: float | None
    seeds: int


@dataclass
class TableStatistics:
    seed: int
    resamples: int
    level: float
    intervals: dict = field(default_factory=dict)    # (row, task or AVERAGE) -> (low, high)
    examples: dict = field(default_factory=dict)     # (row, task) -> whether test examples were resampled
    separation: dict = field(default_factory=dict)   # column -> Separation
    ranking: dict = field(default_factory=dict)      # column -> {row: (share ranked first, mean rank)}
    reference: str | None = None
    comparisons: dict = field(default_factory=dict)  # (row, task) -> Comparison
    defaults: dict = field(default_factory=dict)     # (row, task) -> (default value, Score or None: not run)
    curves: dict = field(default_factory=dict)       # (row, task) -> [(tuned value, Score, chosen)]


def sample_of(runs: list, metric: str, agg: str) -> Sample:
    """The bootstrap sample of a cell's runs: per-example results when every run has them on the same
    test examples (each checked against the value its record reports), else seeds only."""
    task_type = runs[0].task_type
    examples = None
    if supports(task_type, metric) and all(r.predictions is not None for r in runs):
        examples = [r.examples for r in runs]
        for run, found in zip(runs, examples):
            check_against(found, metric, run.test)
        if not all(examples[0].pairs_with(e) for e in examples[1:]):
            examples = None
    return Sample(task_type, metric, [r.seed for r in runs], [r.test for r in runs], agg, examples)


def _column_direction(table: Table, column: str) -> bool | None:
    if column != AVERAGE:
        return higher_is_better(table.metrics[column])
    directions = {higher_is_better(table.metrics[t]) for t in table.tasks}
    return directions.pop() if len(directions) == 1 else None


def _average_part(parts: list[Resampled | None], name: str) -> Resampled | None:
    if any(p is None for p in parts):
        return None
    return combine(parts, [1 / len(parts)] * len(parts), name)


def add_statistics(table: Table, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL,
                   compare_to: str | None = None, curves: bool = False) -> TableStatistics:
    """Compute the table's statistics and attach them (``table.stats``); returns them."""
    stats = TableStatistics(seed, resamples, level)
    samples = {key: sample_of(cell.runs, table.metrics[key[1]], table.agg)
               for key, cell in table.cells.items() if cell.runs and math.isfinite(cell.value)}
    resampled = {key: cell_resampled(s, "|".join(key)) for key, s in samples.items()}
    for key, sample in samples.items():
        stats.examples[key] = bool(sample.examples)
        if resampled[key] is not None:
            stats.intervals[key] = interval(resampled[key], seed, resamples, level)
    multi = len(table.tasks) > 1
    if multi:
        for row in table.rows:
            if all((row, t) in samples for t in table.tasks):
                part = _average_part([resampled[(row, t)] for t in table.tasks], f"{row}|{AVERAGE}")
                if part is not None:
                    stats.intervals[(row, AVERAGE)] = interval(part, seed, resamples, level)
    columns = list(table.tasks) + ([AVERAGE] if multi else [])
    for column in columns:
        higher = _column_direction(table, column)
        if higher is not None:
            _rank_column(table, stats, samples, column, higher)
    if compare_to is not None:
        stats.reference = reference_row(table, compare_to)
        _compare(table, stats, samples)
    if any(key in DEFAULTS for key in table.tune):
        _defaults(table, stats, curves)
    table.stats = stats
    return stats


def _rows_of(table: Table, samples: dict, column: str) -> list[str]:
    tasks = table.tasks if column == AVERAGE else [column]
    return [row for row in table.rows if all((row, t) in samples for t in tasks)]


def _value(table: Table, row: str, column: str) -> float:
    return table.average(row) if column == AVERAGE else table.cells[(row, column)].value


def _rank_column(table: Table, stats: TableStatistics, samples: dict, column: str, higher: bool) -> None:
    rows = _rows_of(table, samples, column)
    if not rows:
        return
    ordered = sorted(rows, key=lambda r: -_value(table, r, column) if higher else _value(table, r, column))
    best, runner = ordered[0], (ordered[1] if len(ordered) > 1 else None)
    if runner is None:
        stats.separation[column] = Separation(best, None, True)
    else:
        tasks = table.tasks if column == AVERAGE else [column]
        parts = [difference(samples[(best, t)], samples[(runner, t)], f"{best}-{runner}|{t}") for t in tasks]
        diff = _average_part(parts, f"{best}-{runner}|{column}")
        estimate = _value(table, best, column) - _value(table, runner, column)
        low = high = None
        if diff is not None:
            low, high = interval(diff, stats.seed, stats.resamples, stats.level)
        separated = low is not None and (low > 0 if higher else high < 0)
        stats.separation[column] = Separation(best, runner, separated, estimate, low, high)
        tasks_distributions = [joint_distributions({r: samples[(r, t)] for r in rows}, stats.seed, stats.resamples, t)
                               for t in tasks]
        distributions = {r: np.mean([d[r] for d in tasks_distributions], axis=0) for r in rows}
        stats.ranking[column] = rank_stability(distributions, higher)


def reference_row(table: Table, name: str) -> str:
    """The row ``--compare-to`` names: its label, or a case-insensitive label or unique prefix of one."""
    if name in table.rows:
        return name
    lowered = [r for r in table.rows if r.lower() == name.lower()] or \
              [r for r in table.rows if r.lower().startswith(name.lower())]
    if len(lowered) == 1:
        return lowered[0]
    found = "matches several rows" if lowered else "is not a row"
    raise TableError(f"--compare-to {name!r} {found} (rows: {', '.join(table.rows)})")


def _compare(table: Table, stats: TableStatistics, samples: dict) -> None:
    ref = stats.reference
    for task in table.tasks:
        if (ref, task) not in samples:
            continue
        for row in table.rows:
            if row == ref or (row, task) not in samples:
                continue
            a, b = samples[(row, task)], samples[(ref, task)]
            estimate = table.cells[(row, task)].value - table.cells[(ref, task)].value
            name = f"{row}-{ref}|{task}"
            paired = pairing(a, b)
            diff = paired.difference(name) if paired else difference(a, b, name)
            low, high = interval(diff, stats.seed, stats.resamples, stats.level) if diff else (None, None)
            p = paired.p_value(stats.seed, stats.resamples, name) if paired else None
            stats.comparisons[(row, task)] = Comparison(estimate, low, high, p, paired.units if paired else "unpaired")


def _score(runs: list, metric: str, agg: str, stats: TableStatistics, name: str) -> Score:
    sample = sample_of(runs, metric, agg)
    value = float(np.median(sample.values) if agg == "median" else sample.values.mean())
    resampled = cell_resampled(sample, name)
    low, high = interval(resampled, stats.seed, stats.resamples, stats.level) if resampled else (None, None)
    return Score(value, low, high, len(runs))


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _defaults(table: Table, stats: TableStatistics, curves: bool) -> None:
    """Each cell's score at the method's default of the tuned key (when that value was run with the
    other tuned keys at their chosen values) and, with ``curves``, its score at every value tried."""
    key = next(k for k in table.tune if k in DEFAULTS)
    position = table.tune.index(key)
    for (row, task), cell in table.cells.items():
        if not cell.runs:
            continue
        metric, groups = table.metrics[task], table.groups.get((row, task), {})
        default = lookup(cell.runs[0].config, DEFAULTS[key], required=False)
        others = [(k, v) for k, v in cell.chosen.items() if k != key]
        match = [tuned for tuned, runs in groups.items() if runs and _same(tuned[position], default)
                 and all(_same(tuned[table.tune.index(k)], v) for k, v in others)]
        score = _score(groups[match[0]], metric, table.agg, stats, f"{row}|{task}|default") if match else None
        stats.defaults[(row, task)] = (default, score)
        if curves:
            points = [(tuned[position], _score(runs, metric, table.agg, stats, f"{row}|{task}|{tuned}"),
                       _same(tuned[position], cell.chosen.get(key)))
                      for tuned, runs in groups.items() if runs and isinstance(tuned[position], (int, float))
                      and all(_same(tuned[table.tune.index(k)], v) for k, v in others)]
            stats.curves[(row, task)] = sorted(points, key=lambda p: p[0])
