"""Per-study figure of a prediction: the located levels on their slices, with the grades."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spinegrade.constants import (  # noqa: E402
    CONDITION_ABBREVIATIONS,
    CONDITIONS,
    LEVEL_TITLES,
    SEVERITIES,
)
from spinegrade.report.localizer import LEVEL_COLOURS  # noqa: E402
from spinegrade.report.plots import CLASS_COLOURS, save_figure  # noqa: E402


def _display(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (0.5, 99.5))
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def _panels(result: Any, max_per_series: int) -> list[tuple[str, Any, int, Any]]:
    """(series id, volume, slice index, rows located on that instance) per panel."""
    panels = []
    loc = result.located
    for sid, vol in result.volumes.items():
        rows = loc[loc["series_id"] == sid]
        if rows.empty:
            continue
        counts = rows.groupby("instance_number").size().sort_values(ascending=False)
        for inst in list(counts.index)[:max_per_series]:
            try:
                j = vol.index_of(int(inst))
            except KeyError:
                continue
            panels.append((sid, vol, j, rows[rows["instance_number"] == inst]))
    return panels


def plot_study(result: Any, path: str | Path, max_per_series: int = 3) -> Path:
    """Located levels (marker per keypoint, colour per level) and predicted grades.

    Args:
        result: an ``engine.predict.StudyResult`` (study_id, probs, source, located, volumes).
        path: PNG to write.
        max_per_series: panels per series (the instances holding the most keypoints).
    """
    panels = _panels(result, max_per_series)
    n = len(panels) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
    axes = axes[0]
    for ax, (sid, vol, j, rows) in zip(axes, panels, strict=False):
        ax.imshow(_display(vol.slices[j]), cmap="gray")
        for r in rows.itertuples():
            col = LEVEL_COLOURS[int(r.level_idx)]
            key = (r.condition, int(r.level_idx))
            graded = result.source.get(key) == "model"
            # A prior is never shown as a grade: those points are marked as not graded.
            grade = SEVERITIES[int(np.argmax(result.probs[key]))][:3] if graded else "n/g"
            ax.plot(r.x, r.y, "+" if graded else "x", color=col if graded else "grey",
                    ms=9, mew=1.6)
            label = CONDITION_ABBREVIATIONS.get(r.condition, r.condition)
            ax.annotate(f"{label} {grade}", (r.x, r.y),
                        xytext=(4, -4), textcoords="offset points", color=col, fontsize=6)
        ax.set_title(f"{vol.series_description or sid}\ninstance {vol.instance_numbers[j]}",
                     fontsize=7)
        ax.axis("off")
    _grade_grid(axes[-1], result)
    fig.suptitle(f"study {result.study_id}: located levels and predicted grades "
                 f"({result.seconds:.1f} s)", fontsize=9)
    return save_figure(fig, path)


def _grade_grid(ax: plt.Axes, result: Any) -> None:
    """Level x condition grid coloured by predicted grade; grey and hatched, with no grade
    and no probability, where the prior was used (not graded)."""
    conds = list(CONDITIONS)
    ax.set_xlim(0, len(conds))
    ax.set_ylim(len(LEVEL_TITLES), 0)
    for i, _ in enumerate(LEVEL_TITLES):
        for c, cond in enumerate(conds):
            p = np.asarray(result.probs[(cond, i)])
            k = int(np.argmax(p))
            if result.source[(cond, i)] != "model":
                ax.add_patch(plt.Rectangle((c, i), 1, 1, color="lightgrey", hatch="//",
                                           ec="white"))
                ax.text(c + 0.5, i + 0.5, "n/g", ha="center", va="center", fontsize=6)
                continue
            ax.add_patch(plt.Rectangle((c, i), 1, 1, color=CLASS_COLOURS[k], alpha=0.35 + 0.6 * p[k],
                                       ec="white"))
            ax.text(c + 0.5, i + 0.5, f"{p[2]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(np.arange(len(conds)) + 0.5, [CONDITION_ABBREVIATIONS[c] for c in conds],
                  fontsize=6)
    ax.set_yticks(np.arange(len(LEVEL_TITLES)) + 0.5, LEVEL_TITLES, fontsize=6)
    ax.set_title("grade (colour) and P(severe); n/g = not graded (prior)", fontsize=7)
