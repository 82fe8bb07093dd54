"""PNG figures for evaluation results (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def heatmap(values: np.ndarray, row_labels: Sequence, col_labels: Sequence, path: str | os.PathLike,
            title: str = "", xlabel: str = "needle depth (%)", ylabel: str = "context length (tokens)",
            vmin: float = 0.0, vmax: float = 100.0) -> Path:
    """Accuracy grid ``values[row, col]`` (rows = lengths, cols = depths) with the numbers written in."""
    plt = _plt()
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(col_labels), 1.2 + 0.5 * len(row_labels)))
    im = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title)
    return _save(fig, path)


def lines(series: dict[str, tuple[Sequence, Sequence]], path: str | os.PathLike, title: str = "",
          xlabel: str = "", ylabel: str = "", logx: bool = False, logy: bool = False,
          ylim: tuple[float, float] | None = None) -> Path:
    """One line per named series ``{name: (xs, ys)}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def panels(panel_series: dict[str, dict[str, tuple[Sequence, Sequence]]], path: str | os.PathLike,
           title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False,
           ylim: tuple[float, float] | None = None) -> Path:
    """Side-by-side line plots, one panel per key of ``panel_series`` (e.g. one per sequence length)."""
    plt = _plt()
    n = max(1, len(panel_series))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panel_series.items()):
        for name, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
        if logx:
            ax.set_xscale("log", base=2)
            ticks = sorted({x for xs, _ in series.values() for x in xs})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def grouped_bars(groups: Sequence[str], bars: dict[str, Sequence[float]], path: str | os.PathLike,
                 title: str = "", ylabel: str = "") -> Path:
    """Grouped bar chart: for each group (x position) one bar per key of ``bars``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * max(1, len(bars)) * 0.45 + 2), 4))
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(bars.items()):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, list(vals), width, label=name)
    ax.set_xticks(x, list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)
