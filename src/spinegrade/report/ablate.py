"""Figure of the version comparison: BA and per-class recall per epoch for every version."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from spinegrade.constants import CLASS_NAMES, SEVERITIES  # noqa: E402
from spinegrade.report.plots import save_figure  # noqa: E402


def plot_version_curves(curves: dict[str, list[pd.DataFrame]], path: str | Path) -> Path:
    """One panel per metric (BA, then recall of each class); one line per version.

    Args:
        curves: version label -> the metrics.csv frames of its folds (averaged per epoch).
        path: PNG to write.
    """
    panels = [("balanced_accuracy", "balanced accuracy")] + [
        (f"recall_{n}", f"recall {s}") for n, s in zip(CLASS_NAMES, SEVERITIES, strict=True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    for label, frames in curves.items():
        mean = pd.concat(frames).groupby("epoch").mean(numeric_only=True).reset_index()
        for ax, (col, _) in zip(axes, panels, strict=True):
            if col in mean:
                ax.plot(mean["epoch"], mean[col], "-o", ms=3, label=label)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.axhline(0.5 if "recall" in title else 0.0, ls="--", lw=0.6, color="grey")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation")
    axes[-1].legend(fontsize=7, loc="best")
    return save_figure(fig, path)
