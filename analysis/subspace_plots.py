"""Figures for the subspace analysis: phi heatmaps (the LoRA paper's Figures 3 and 4) and spectra."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch

matplotlib.use("Agg")  # files only, never a window

DPI = 90


def _grid(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _heat(ax, phi: np.ndarray, title: str):
    k1, k2 = phi.shape
    im = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                   extent=(0.5, k2 + 0.5, k1 + 0.5, 0.5))
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    for axis, k in ((ax.xaxis, k2), (ax.yaxis, k1)):
        ticks = sorted({1, k} | ({k // 2} if k >= 4 else set()))
        axis.set_ticks(ticks)
    return im


def phi_heatmaps(panels: Sequence[tuple[str, torch.Tensor]], path: Path, title: str,
                 xlabel: str = "j", ylabel: str = "i") -> Path:
    """One heatmap of phi(i, j) per panel (i rows, j columns, scale 0..1), one shared colour bar."""
    rows, cols = _grid(len(panels))
    # Panels of one shape have the same ticks: only the outer ones are labelled, which saves laying out
    # most tick labels of a 32-panel figure (a third of its time; sharing the axes would cost more).
    same_shape = len({tuple(phi.shape) for _, phi in panels}) == 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 1.0, 1.7 * rows + 0.8), squeeze=False)
    im = None
    n = len(panels)
    for i, (ax, (name, phi)) in enumerate(zip(axes.flat, panels)):
        im = _heat(ax, phi.detach().cpu().numpy(), name)
        lowest = i + cols >= n  # no panel below it
        if same_shape:
            ax.tick_params(labelbottom=lowest, labelleft=i % cols == 0)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    width, height = fig.get_size_inches()
    # Once per figure: the axis names hold run labels, too long to repeat under every panel.
    fig.supxlabel(xlabel, fontsize=7, y=0.08 / height, va="bottom")
    fig.supylabel(ylabel, fontsize=7, x=0.06 / width, ha="left")
    fig.subplots_adjust(left=0.55 / width, right=1 - 1.0 / width, bottom=0.5 / height, top=1 - 0.5 / height,
                        wspace=0.3, hspace=0.45)
    cax = fig.add_axes((1 - 0.8 / width, 0.15, 0.12 / width, 0.7))
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def spectra_plot(series: dict[str, list[tuple[int | None, torch.Tensor]]], path: Path, title: str) -> Path:
    """Singular values of ΔW against their index (log scale), one panel per matrix type, a line per layer."""
    types = list(series)
    rows, cols = _grid(len(types), max_cols=3)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, mtype in zip(axes.flat, types):
        lines = series[mtype]
        layers = [layer for layer, _ in lines if layer is not None]
        lo, hi = (min(layers), max(layers)) if layers else (0, 1)
        for layer, S in lines:
            s = S.detach().cpu().numpy()
            s = np.where(s > 0, s, np.nan)
            frac = 0.0 if layer is None or hi == lo else (layer - lo) / (hi - lo)
            ax.plot(np.arange(1, len(s) + 1), s, color=cmap(frac), lw=0.9, marker="." if len(s) <= 16 else None,
                    ms=3, label=None if layer is None else f"layer {layer}")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(mtype, fontsize=9)
        ax.set_xlabel("index of singular value", fontsize=8)
        ax.set_ylabel("singular value of ΔW", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        if layers and hi > lo:
            sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
            cbar = fig.colorbar(sm, ax=ax, pad=0.02)
            cbar.set_label("layer", fontsize=7)
            cbar.ax.tick_params(labelsize=6)
            cbar.ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    # Fixed margins in inches rather than tight_layout, which measures every log-scale tick label
    # (half the time of this figure).
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.5 / height,
                        wspace=0.4, hspace=0.6)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)
