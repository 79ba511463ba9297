"""Plots of a paper table: its metric vs trainable parameters (log x) and vs LoRA rank. The y axis
names the metric: the tasks' one when they share it, else "main metric" (each task's own, averaged)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from lora_lab.tasks.metrics import metric_name

matplotlib.use("Agg")  # files only, never a window


def _completed(table, row: str) -> list:
    return [run for run in table.members.get(row, []) if run.completed]


def _method(table, row: str):
    """The method of a row's runs (all runs of a row share their settings), or None."""
    done = _completed(table, row)
    return done[0].method if done else None


def _task_values(table, row: str) -> tuple[float, float, float] | None:
    """Median, min and max over seeds, averaged over the table's tasks."""
    cells = [table.cells.get((row, t)) for t in table.tasks]
    if not cells or any(c is None or not c.values or not math.isfinite(c.value) for c in cells):
        return None
    mid = sum(c.value for c in cells) / len(cells)
    low = sum(min(c.values) for c in cells) / len(cells)
    high = sum(max(c.values) for c in cells) / len(cells)
    return mid, low, high


def _metric(table) -> str:
    return metric_name(table.metric) if table.metric else "main metric"


def _ylabel(table) -> str:
    tasks = table.tasks[0] if len(table.tasks) == 1 else f"average of {len(table.tasks)} tasks"
    return f"test {_metric(table)} ({tasks})"


def _title(table, what: str) -> str:
    metric = _metric(table)
    return f"{metric[0].upper()}{metric[1:]} vs {what} (median over seeds; bars: min-max)"


def plot_accuracy_vs_parameters(table, path: Path) -> Path | None:
    points = []
    for row in table.rows:
        values, trainable, method = _task_values(table, row), table.params[row][0], _method(table, row)
        if values and trainable and method is not None:
            points.append((row, method, trainable, *values))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    seen = set()
    ranked: dict[str, list] = defaultdict(list)
    for i, (row, method, x, mid, low, high) in enumerate(sorted(points, key=lambda p: p[2])):
        family = method.family or method.name
        color, marker = method.plot_style
        ax.errorbar(x, mid, yerr=[[mid - low], [high - mid]], fmt=marker, color=color, capsize=3,
                    label=None if family in seen else family)
        seen.add(family)
        text = f"r={method.rank()}" if method.rank() else row.split(" (")[0]
        # neighbours on the log axis overlap: alternate the labels above and below the points
        ax.annotate(text, (x, mid), textcoords="offset points", xytext=(5, 5 if i % 2 else -11), fontsize=7)
        if method.rank():
            ranked[family].append((x, mid, color))
    for line in ranked.values():  # a low-rank family's points joined in order of size
        if len(line) > 1:
            xs, ys, colors = zip(*sorted(line))
            ax.plot(xs, ys, color=colors[0], alpha=0.4, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(_ylabel(table))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_title(table, "trainable parameters"), fontsize=10)
    ax.margins(x=0.15)
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
