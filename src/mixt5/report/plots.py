"""The report's plots, drawn from the numbers `aggregate` computed (matplotlib's object API: no pyplot state, no
display needed). Each returns False, drawing nothing, when there is nothing to plot."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .aggregate import CURVES
from .runs import METRICS

METRIC_LABELS = {"exact_match": "EM", "f1": "F1"}


def _save_figure(figure: Any, path: Path) -> None:
    """PNG written beside its final name and renamed over it (`utils.atomic_write` is for text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(staging, format="png", dpi=110, bbox_inches="tight")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _figure(rows: int, columns: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).reshape(-1)
    return figure, axes


def plot_scores(data: dict[str, Any], path: Path, colors: dict[str, str]) -> bool:
    arms = [arm for arm in data if any(data[arm]["per_seed"][m] for m in METRICS)]
    if not arms:
        return False
    figure, axes = _figure(1, 2, width=max(4.2, 1.1 * len(arms) + 1.5))
    for axis, metric in zip(axes, METRICS, strict=True):
        for x, arm in enumerate(arms):
            values = list(data[arm]["per_seed"][metric].values())
            axis.scatter([x] * len(values), values, s=14, color="0.55", zorder=2)
            ci = data[arm].get("ci", {}).get(metric)
            if ci:
                error = None if ci["high"] is None else [[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]]
                axis.errorbar([x], [ci["mean"]], yerr=error, fmt="o", color=colors[arm], capsize=5, zorder=3)
        axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        axis.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
        axis.set_title(f"{METRIC_LABELS[metric]}: mean ± 95% CI, dots = seeds")
        axis.grid(axis="y", alpha=0.3)
    _save_figure(figure, path)
    return True


def plot_curves(data: dict[str, Any], path: Path, colors: dict[str, str]) -> bool:
    if not any(data[arm][key]["step"] for arm in data for key in CURVES):
        return False
    figure, axes = _figure(2, 3)
    for axis, (key, title) in zip(axes, CURVES.items(), strict=True):
        for arm, curves in data.items():
            if curves[key]["step"]:
                marker = "o" if key.startswith("eval") else None
                axis.plot(curves[key]["step"], curves[key]["mean"], label=arm, color=colors[arm], marker=marker)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))
    _save_figure(figure, path)
    return True


def plot_load(data: dict[str, Any], path: Path) -> bool:
    arms = [arm for arm in data if any("train" in layer for layer in data[arm].values())]
    if not arms:
        return False
    columns = min(len(arms), 3)
    rows = math.ceil(len(arms) / columns)
    figure, axes = _figure(rows, columns, width=4.6, height=3.6)
    for axis, arm in zip(axes, arms, strict=False):
        names = [name for name, layer in data[arm].items() if "train" in layer]
        load = np.array([data[arm][name]["train"]["load"] for name in names])  # (layers, experts)
        image = axis.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(load.max()), 1e-9))
        axis.set_yticks(range(len(names)), names)
        axis.set_xticks(range(load.shape[1]), [f"e{k}" for k in range(load.shape[1])])
        axis.set_title(f"{arm}: expert load (train; uniform = {1 / load.shape[1]:.3f})", fontsize=9)
        if load.size <= 160:
            for (row, column), value in np.ndenumerate(load):
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
        figure.colorbar(image, ax=axis, shrink=0.8)
    for axis in axes[len(arms) :]:
        axis.set_visible(False)
    _save_figure(figure, path)
    return True


def plot_similarity(data: dict[str, Any], path: Path, colors: dict[str, str]) -> bool:
    if not data:
        return False
    figure, axes = _figure(1, 2)
    for arm, entry in data.items():
        steps, means = entry["mean_over_layers"]["step"], np.array(entry["mean_over_layers"]["mean"])
        axes[0].plot(steps, means, marker="o", label=arm, color=colors[arm])
        distance = 1.0 - means
        positive = distance > 0
        if positive.any():
            axes[1].plot(np.array(steps)[positive], distance[positive], marker="o", label=arm, color=colors[arm])
    axes[0].ticklabel_format(axis="y", useOffset=False)
    axes[0].set_title("expert cosine similarity\n(mean over pairs and layers)")
    axes[1].set_title("1 − similarity, log scale\n(exact copies, = 0, omitted)")
    axes[1].set_yscale("log")
    for axis in axes:
        axis.set_xlabel("step (saved checkpoints)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save_figure(figure, path)
    return True
