"""Reliability diagram of a calibration: confidence against observed accuracy, before/after.

Takes plain arrays or :class:`spinegrade.reliability.ReliabilityBins`; writes one PNG
atomically (through ``report.plots.save_figure``) or returns the figure. Matplotlib runs
headless (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spinegrade.reliability import DEFAULT_BINS, ReliabilityBins, reliability_bins  # noqa: E402
from spinegrade.report.plots import save_figure  # noqa: E402

CURVE_STYLES = {"before": ("#C44E52", "s"), "after": ("#4C72B0", "o")}
OTHER_STYLE = ("#55A868", "^")


def reliability_figure(curves: Mapping[str, ReliabilityBins], title: str = "") -> plt.Figure:
    """Reliability curves (top) and sample counts per bin (bottom), one series per curve.

    Args:
        curves: name (e.g. "before", "after") -> its bins; all must share the same edges.
            Each legend entry carries that curve's ECE.
        title: figure title.
    """
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": (3, 1.2)})
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
    names = list(curves)
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        bins = curves[name]
        colour, marker = CURVE_STYLES.get(name, OTHER_STYLE)
        full = bins.weight > 0
        ax.plot(bins.confidence[full], bins.accuracy[full], "-", marker=marker, ms=4,
                color=colour, label=f"{name} (ECE {bins.ece:.3f})")
        centres = (bins.edges[:-1] + bins.edges[1:]) / 2
        step = np.diff(bins.edges)
        hist.bar(centres + (k - (len(names) - 1) / 2) * width * step, bins.count,
                 width * step, color=colour, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "reliability diagram", fontsize=10)
    hist.set_xlabel("predicted confidence")
    hist.set_ylabel("count")
    hist.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_reliability(probs_before: np.ndarray, probs_after: np.ndarray | None,
                     labels: np.ndarray, path: str | Path | None = None, *,
                     weights: np.ndarray | None = None, n_bins: int = DEFAULT_BINS,
                     title: str = "") -> Path | plt.Figure:
    """Reliability diagram of probabilities before and (optionally) after calibration.

    Args:
        probs_before: (n, K) uncalibrated probabilities.
        probs_after: (n, K) calibrated probabilities, or None for one curve.
        labels: (n,) true classes.
        path: PNG to write atomically; None returns the open figure instead.
        weights: (n,) sample weights for the bins and ECE (the fit's weights).
        n_bins: equal-width confidence bins.
        title: figure title.

    Returns:
        ``path`` once written, or the figure when ``path`` is None (the caller closes it).
    """
    curves = {"before": reliability_bins(probs_before, labels, n_bins, weights)}
    if probs_after is not None:
        curves["after"] = reliability_bins(probs_after, labels, n_bins, weights)
    fig = reliability_figure(curves, title)
    return fig if path is None else save_figure(fig, path)
