"""Figures for people: learning curves (the paper's Figure 5) and AP against images per class
(its Figures 3 and 4), as PNG files. matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_learning_curves", "plot_metric_vs_shots", "pyplot", "save_figure"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, path: str | Path, title: str = "") -> Path:
    """Title, lay out, write ``path`` (PNG) and close ``figure``."""
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _finite(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def plot_learning_curves(runs: Mapping[str, Sequence[Mapping]], path: str | Path, *,
                         metrics: Sequence[str] = ("AP50", "AP"), title: str = "") -> Path:
    """One panel per metric, one line per run: the metric (percent) against the iteration.

    ``runs``: label -> evaluations, each a mapping with ``iteration`` and the metrics (as
    ``metrics.jsonl`` holds them; missing or NaN values are left out).
    """
    plt = pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for i, (label, evaluations) in enumerate(runs.items()):
            points = [(e["iteration"], e[metric]) for e in evaluations if _finite(e.get(metric))]
            if points:
                xs, ys = zip(*points)
                # Past the 10 colours of the cycle, a new line style keeps every run told apart.
                axis.plot(xs, ys, marker="o", markersize=3, label=label, linestyle=("-", "--", ":", "-.")[i // 10 % 4])
        axis.set_xlabel("fine-tuning iteration")
        axis.set_ylabel(f"{metric} (%)")
        axis.grid(alpha=0.3)
        if len(runs) > 6:  # beside the panel, not over the lines
            axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            axis.legend(fontsize=8)
    return save_figure(plt, figure, path, title)


def plot_metric_vs_shots(table: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, *,
                         metrics: Sequence[str] = ("AP", "AP50"), title: str = "") -> Path:
    """AP against images per class, one line with error bars (standard deviation over seeds) per
    initialisation, as the paper's Figures 3 and 4.

    ``table``: init label -> shots label (``"5"``, ``"10"``, ..., ``"all"``) -> metric ->
    ``{"mean", "std"}``. The shots are placed in the order of the first init's table.
    """
    plt = pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        shots: list[str] = []
        for rows in table.values():
            shots += [s for s in rows if s not in shots]
        for label, rows in table.items():
            xs = [i for i, s in enumerate(shots) if s in rows and _finite(rows[s][metric].get("mean"))]
            means = [rows[shots[i]][metric]["mean"] for i in xs]
            stds = [rows[shots[i]][metric].get("std") or 0.0 for i in xs]
            axis.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=label)
        axis.set_xticks(range(len(shots)), [s if s == "all" else f"{s}-shot" for s in shots])
        axis.set_xlabel("training images per class")
        axis.set_ylabel(f"{metric} (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    return save_figure(plt, figure, path, title)
