"""Figures of a training run: loss and recall curves, confusion matrix, slice weights, health.

Each function takes plain data (a metrics frame, a matrix, a list) and writes one PNG; none
reads files or knows about training. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spinegrade.constants import CLASS_NAMES, SEVERITIES  # noqa: E402
from spinegrade.io.atomic import atomic_path  # noqa: E402

CLASS_COLOURS = ("#4C72B0", "#DD8452", "#C44E52")
STATUS_COLOURS = {"pass": "#d4edda", "warn": "#fff3cd", "alarm": "#f8d7da", "fail": "#f8d7da",
                  "n/a": "#eeeeee", "pending": "#eeeeee"}


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _shade_phases(ax: plt.Axes, metrics: pd.DataFrame) -> None:
    """Shade each training phase so curves can be read against the schedule."""
    if "phase" not in metrics:
        return
    colours = {"frozen": "#e8e8f8", "finetune": "#ffffff", "swa": "#e8f8e8"}
    for phase, rows in metrics.groupby("phase", sort=False):
        lo, hi = rows["epoch"].min() - 0.5, rows["epoch"].max() + 0.5
        ax.axvspan(lo, hi, color=colours.get(str(phase), "#f4f4f4"), zorder=0, lw=0)
        ax.text((lo + hi) / 2, 1.0, str(phase), transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="#555555")


def plot_losses(metrics: pd.DataFrame, path: str | Path) -> Path:
    """Train and validation loss per epoch, with the train-val gap."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    _shade_phases(ax, metrics)
    for col, style in (("train_loss", "-o"), ("val_loss", "-s")):
        if col in metrics:
            ax.plot(metrics["epoch"], metrics[col], style, ms=3, label=col.replace("_", " "))
    if "weighted_logloss" in metrics:
        ax.plot(metrics["epoch"], metrics["weighted_logloss"], ":", label="val weighted log loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_recall(metrics: pd.DataFrame, path: str | Path, targets: Sequence[float] = (0.5, 0.3)
                ) -> Path:
    """Per-class recall and balanced accuracy per epoch; dashed lines at the health targets."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    _shade_phases(ax, metrics)
    for name, colour, label in zip(CLASS_NAMES, CLASS_COLOURS, SEVERITIES, strict=True):
        col = f"recall_{name}"
        if col in metrics:
            ax.plot(metrics["epoch"], metrics[col], "-o", ms=3, color=colour, label=label)
    if "balanced_accuracy" in metrics:
        ax.plot(metrics["epoch"], metrics["balanced_accuracy"], "-", lw=2.5, color="black",
                label="balanced accuracy")
    for t in targets:
        ax.axhline(t, ls="--", lw=0.8, color="grey")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_confusion(cm: Sequence[Sequence[int]], path: str | Path, title: str = "") -> Path:
    """Confusion matrix (rows: true grade) with counts and row-normalised percentages."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{frac[i, j]:.0%}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=9)
    ticks = range(len(SEVERITIES))
    ax.set_xticks(ticks, SEVERITIES, fontsize=8)
    ax.set_yticks(ticks, SEVERITIES, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=10)
    return save_figure(fig, path)


def plot_slice_weights(weights_per_epoch: Sequence[Sequence[float]], path: str | Path) -> Path:
    """The aggregator's softmax slice weights: last epoch as bars, all epochs as a heatmap."""
    w = np.asarray(weights_per_epoch, dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    offsets = np.arange(w.shape[1]) - w.shape[1] // 2
    ax1.bar(offsets, w[-1], color="#4C72B0")
    ax1.set_xlabel("slice offset from the labeled instance")
    ax1.set_ylabel("weight (last epoch)")
    im = ax2.imshow(w.T, aspect="auto", cmap="viridis", origin="lower",
                    extent=(0.5, w.shape[0] + 0.5, offsets[0] - 0.5, offsets[-1] + 0.5))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("slice offset")
    fig.colorbar(im, ax=ax2, fraction=0.05)
    return save_figure(fig, path)


def plot_per_level_recall(per_level: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Grouped bars: recall of each class at each disc level."""
    levels = list(per_level)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    width = 0.8 / len(CLASS_NAMES)
    for k, (name, colour, label) in enumerate(zip(CLASS_NAMES, CLASS_COLOURS, SEVERITIES, strict=True)):
        vals = [per_level[lv].get(name, np.nan) for lv in levels]
        ax.bar(np.arange(len(levels)) + (k - 1) * width, np.nan_to_num(vals, nan=0.0),
               width, color=colour, label=label)
    ax.set_xticks(range(len(levels)), levels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def parse_json_column(values: pd.Series) -> list:
    """Decode a metrics.csv column that holds JSON (confusion matrices, slice weights)."""
    return [json.loads(v) if isinstance(v, str) and v else None for v in values]
