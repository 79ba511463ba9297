"""Plots of a paper table: the cost fronts (its metric vs trainable parameters, log x, vs peak memory
and vs training time per example, the Pareto front drawn and dominated rows hollow), the metric vs
LoRA rank and, with ``--tune trainer.lr``, vs learning rate. The y axis names the metric: the tasks'
one when they share it, else "main metric" (each task's own, averaged). Bars and bands are the
table's 95 % intervals when it has them, else the min-max over seeds."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from lora_lab.analysis.fronts import COSTS, cost, fronts
from lora_lab.analysis.table_stats import AVERAGE
from lora_lab.tasks.metrics import metric_name

matplotlib.use("Agg")  # files only, never a window


def _completed(table, row: str) -> list:
    return [run for run in table.members.get(row, []) if run.completed]


def _method(table, row: str):
    """The method of a row's runs (all runs of a row share their settings), or None."""
    done = _completed(table, row)
    return done[0].method if done else None


def _task_values(table, row: str) -> tuple[float, float, float] | None:
    """Median and its interval (without statistics: min and max over seeds), averaged over the tasks."""
    cells = [table.cells.get((row, t)) for t in table.tasks]
    if not cells or any(c is None or not c.values or not math.isfinite(c.value) for c in cells):
        return None
    mid = sum(c.value for c in cells) / len(cells)
    bounds = table.stats.intervals.get((row, AVERAGE if len(cells) > 1 else table.tasks[0])) if table.stats else None
    if bounds is not None:
        return mid, bounds[0], bounds[1]
    low = sum(min(c.values) for c in cells) / len(cells)
    high = sum(max(c.values) for c in cells) / len(cells)
    return mid, low, high


def _bars(table) -> str:
    return f"bars: {100 * table.stats.level:g} % interval" if table.stats else "bars: min-max"


def _metric(table) -> str:
    return metric_name(table.metric) if table.metric else "main metric"


def _ylabel(table) -> str:
    tasks = table.tasks[0] if len(table.tasks) == 1 else f"average of {len(table.tasks)} tasks"
    return f"test {_metric(table)} ({tasks})"


def _title(table, what: str) -> str:
    metric = _metric(table)
    return f"{metric[0].upper()}{metric[1:]} vs {what} (median over seeds; {_bars(table)})"


def plot_accuracy_vs_parameters(table, path: Path) -> Path | None:
    """The cost fronts: one panel per cost, each row placed, the front joined, dominated rows hollow."""
    points = []
    for row in table.rows:
        values, method = _task_values(table, row), _method(table, row)
        if values and method is not None and table.params[row][0]:
            points.append((row, method, *values))
    if not points:
        return None
    found = fronts(table)
    fig, axes = plt.subplots(1, len(COSTS), figsize=(16, 4.8), sharey=True)
    for ax, spec in zip(axes, COSTS):
        seen, ranked, front = set(), defaultdict(list), []
        placed = [(cost(table, p[0], spec.key), *p) for p in points]
        placed = sorted((p for p in placed if p[0]), key=lambda p: p[0])
        for i, (x, row, method, mid, low, high) in enumerate(placed):
            family = method.family or method.name
            color, marker = method.plot_style
            dominated = found[spec.key].get(row) is not None
            ax.errorbar(x, mid, yerr=[[mid - low], [high - mid]], fmt=marker, color=color, capsize=3,
                        mfc="none" if dominated else color, alpha=0.55 if dominated else 1.0,
                        label=None if family in seen else family)
            seen.add(family)
            text = f"r={method.rank()}" if method.rank() else row.split(" (")[0]
            if spec.key == "params" or not dominated:  # on the other costs the rows crowd: name the front only
                # neighbours overlap: alternate the labels above and below the points
                ax.annotate(text, (x, mid), textcoords="offset points", xytext=(5, 5 if i % 2 else -11), fontsize=7)
            if method.rank() and spec.key == "params":
                ranked[family].append((x, mid, color))
            if row in found[spec.key] and found[spec.key][row] is None:
                front.append((x, mid))
        for line in ranked.values():  # a low-rank family's points joined in order of size
            if len(line) > 1:
                xs, ys, colors = zip(*sorted(line))
                ax.plot(xs, ys, color=colors[0], alpha=0.4, linewidth=1)
        if len(front) > 1:
            xs, ys = zip(*sorted(front))
            ax.step(xs, ys, where="post", color="black", linestyle=":", linewidth=1, label="Pareto front")
        if spec.log:
            ax.set_xscale("log")
        ax.set_xlabel(spec.axis)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15)
    axes[0].set_ylabel(_ylabel(table))
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Cost fronts: {_metric(table)} vs trainable parameters, memory and time "
                 f"(median over seeds; {_bars(table)}; hollow: dominated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_rank(table, path: Path) -> Path | None:
    """One line per low-rank setting other than r (method, targets, scaling, init); x = r on a log2 axis."""
    series: dict[str, list] = defaultdict(list)
    for row in table.rows:
        method, values = _method(table, row), _task_values(table, row)
        if method is None or not method.rank() or values is None:
            continue
        for name in method.rank_series():
            series[name].append((method.rank(), *values))
    series = {k: sorted(v) for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in series.items():
        rs, mids, lows, highs = zip(*points)
        ax.errorbar(rs, mids, yerr=[[m - lo for m, lo in zip(mids, lows)], [h - m for m, h in zip(mids, highs)]],
                    marker="o", capsize=3, label=label)
    full = [row for row in table.rows if getattr(_method(table, row), "trains_every_weight", False)]
    if full and _task_values(table, full[0]):
        ax.axhline(_task_values(table, full[0])[0], color="black", linestyle="--", linewidth=1, label="Full FT")
    ax.set_xscale("log", base=2)
    ranks = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel(_ylabel(table))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(table, "rank"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_lr(table, path: Path) -> Path | None:
    """Per task, one curve per row: the test median at every learning rate tried, its interval as a
    band, the rate chosen on validation as a star."""
    curves = table.stats.curves if table.stats else {}
    tasks = [t for t in table.tasks if any(len(curves.get((r, t), [])) > 1 for r in table.rows)]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.6), squeeze=False)
    palette = plt.get_cmap("tab10" if len(table.rows) <= 10 else "tab20")
    for ax, task in zip(axes[0], tasks):
        for i, row in enumerate(table.rows):
            points = curves.get((row, task), [])
            if len(points) < 2:
                continue
            color = palette(i % palette.N)  # one colour per row: a family's rows must stay apart here
            xs = [p[0] for p in points]
            mids = [p[1].value for p in points]
            lows = [p[1].low if p[1].low is not None else p[1].value for p in points]
            highs = [p[1].high if p[1].high is not None else p[1].value for p in points]
            line, = ax.plot(xs, mids, marker="o", markersize=3, label=row, color=color)
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.12)
            chosen = [(x, m) for (x, _, c), m in zip(points, mids) if c]
            if chosen:
                ax.plot(*chosen[0], marker="*", markersize=11, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(f"test {metric_name(table.metrics[task])} ({task})")
        ax.grid(alpha=0.3)
        ax.set_title(f"{task}: median over seeds, band: {100 * table.stats.level:g} % interval; "
                     "star: chosen on validation", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
