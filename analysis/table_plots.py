"""Plots of a paper table: accuracy vs trainable parameters (log x) and accuracy vs LoRA rank."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FAMILY_STYLE = {"full": ("Full FT", "black", "s"), "head": ("Head / FT-top-K", "tab:gray", "v"),
                "adapter": ("Adapters", "tab:orange", "D"), "lora": ("LoRA", "tab:blue", "o")}


def _completed(table, row: str) -> list:
    return [run for run in table.members.get(row, []) if run.completed]


def _family(table, row: str) -> str:
    done = _completed(table, row)
    return done[0].config.get("method", {}).get("name", "other") if done else "other"


def _task_values(table, row: str) -> tuple[float, float, float] | None:
    """Median, min and max over seeds, averaged over the table's tasks."""
    cells = [table.cells.get((row, t)) for t in table.tasks]
    if not cells or any(c is None or not c.values or not math.isfinite(c.value) for c in cells):
        return None
    mid = sum(c.value for c in cells) / len(cells)
    low = sum(min(c.values) for c in cells) / len(cells)
    high = sum(max(c.values) for c in cells) / len(cells)
    return mid, low, high


def _ylabel(table) -> str:
    tasks = table.tasks[0] if len(table.tasks) == 1 else f"average of {len(table.tasks)} tasks"
    return f"test {table.metric} ({tasks})"


def plot_accuracy_vs_parameters(table, path: Path) -> Path | None:
    points = []
    for row in table.rows:
        values, trainable = _task_values(table, row), table.params[row][0]
        if values and trainable:
            points.append((row, _family(table, row), trainable, *values))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    seen = set()
    for i, (row, family, x, mid, low, high) in enumerate(sorted(points, key=lambda p: p[2])):
        label, color, marker = FAMILY_STYLE.get(family, (family, "tab:purple", "x"))
        ax.errorbar(x, mid, yerr=[[mid - low], [high - mid]], fmt=marker, color=color, capsize=3,
                    label=None if family in seen else label)
        seen.add(family)
        text = row.split(" α=")[0].replace("LoRA ", "") if family == "lora" else row.split(" (")[0]
        # neighbours on the log axis overlap: alternate the labels above and below the points
        ax.annotate(text, (x, mid), textcoords="offset points", xytext=(5, 5 if i % 2 else -11), fontsize=7)
    lora = sorted((x, mid) for _, family, x, mid, *_ in points if family == "lora")
    if len(lora) > 1:
        ax.plot(*zip(*lora), color=FAMILY_STYLE["lora"][1], alpha=0.4, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(_ylabel(table))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Accuracy vs trainable parameters (median over seeds; bars: min-max)", fontsize=10)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_accuracy_vs_rank(table, path: Path) -> Path | None:
    """One line per LoRA setting other than r (targets, scaling, init); x = r on a log2 axis."""
    series: dict[str, list] = defaultdict(list)
    for row in table.rows:
        lora = [r for r in _completed(table, row) if r.config["method"].get("name") == "lora"]
        values = _task_values(table, row)
        if not lora or values is None:
            continue
        method = lora[0].config["method"]
        r = lora[0].resolved.get("r") or method.get("r")
        base = "+".join(map(str, method.get("targets", [])))
        base += ", rsLoRA" if method.get("rslora") else ""
        base += f", {method['init']} init" if method.get("init", "kaiming") != "kaiming" else ""
        series[f"{base}, alpha={method.get('alpha')}"].append((r, *values))
        if method.get("alpha") == r and not method.get("rslora"):  # also on the alpha = r line
            series[f"{base}, alpha=r"].append((r, *values))
    series = {k: sorted(v) for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in series.items():
        rs, mids, lows, highs = zip(*points)
        ax.errorbar(rs, mids, yerr=[[m - lo for m, lo in zip(mids, lows)], [h - m for m, h in zip(mids, highs)]],
                    marker="o", capsize=3, label=label)
    full = [row for row in table.rows if _family(table, row) == "full"]
    if full and _task_values(table, full[0]):
        ax.axhline(_task_values(table, full[0])[0], color="black", linestyle="--", linewidth=1, label="Full FT")
    ax.set_xscale("log", base=2)
    ranks = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(_ylabel(table))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs LoRA rank (median over seeds; bars: min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
