"""Figure of the localizer on held-out series: predicted vs true points on the true slices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spinegrade.constants import LEVELS  # noqa: E402
from spinegrade.metrics import wrong_disc  # noqa: E402
from spinegrade.report.plots import save_figure  # noqa: E402

LEVEL_COLOURS = ("#e41a1c", "#ff7f00", "#ffff33", "#4daf4a", "#377eb8")


def plot_overlay(labelled: Sequence[Any], errors: pd.DataFrame, task: Any, path: str | Path,
                 max_series: int = 6) -> Path:
    """Per held-out series, the true slice of each keypoint with true (o) and predicted (x) points.

    One row per series (at most ``max_series``), one panel per distinct true slice. Colours
    are levels; the panel title lists the predicted instance where it differs from the true one.

    Args:
        labelled: ``SeriesLabels`` of held-out series (their prepared images are drawn).
        errors: :func:`spinegrade.metrics.keypoint_errors` output for them (points nearer
            another level's true disc, ``metrics.wrong_disc``, are marked WRONG DISC).
        task: the ``LocalizerTask`` (for the name in the title).
        path: PNG to write.
        max_series: series shown.
    """
    errors = errors.assign(wrong_disc=wrong_disc(errors))
    # A series of several stacks is several SeriesLabels: each shows the slices it holds.
    panels = [(lab, sorted(set(errors.loc[errors["series_id"] == lab.series.series_id,
                                          "true_instance"]) & set(lab.series.instance_numbers)))
              for lab in labelled]
    panels = [p for p in panels if p[1]][:max_series]
    ncols = max((len(p) for _, p in panels), default=1)
    fig, axes = plt.subplots(max(len(panels), 1), ncols, figsize=(3.0 * ncols, 3.0 * max(len(panels), 1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (lab, instances) in enumerate(panels):
        s = lab.series
        rows = errors[errors["series_id"] == s.series_id]
        for c, inst in enumerate(instances):
            j = int(np.flatnonzero(s.instance_numbers == inst)[0])
            ax = axes[r, c]
            ax.imshow(s.images[j], cmap="gray")
            here = rows[rows["true_instance"] == inst]
            notes = []
            for e in here.itertuples():
                col = LEVEL_COLOURS[LEVELS.index(e.level)]
                tx, ty = s.to_grid(j, e.true_x, e.true_y)
                # The prediction is drawn in this slice's grid even when it was made on a
                # neighbouring slice (same in-plane geometry in a sagittal stack).
                px, py = s.to_grid(j, e.pred_x, e.pred_y)
                ax.plot(tx, ty, "o", mfc="none", mec=col, ms=7, mew=1.5)
                ax.plot(px, py, "x", color=col, ms=7, mew=1.5)
                if e.pred_instance != e.true_instance:
                    notes.append(f"{e.level[:2]}->{e.pred_instance}")
                if e.wrong_disc:
                    notes.append(f"{e.level[:2]} WRONG DISC")
            ax.set_title(f"{s.study_id} inst {inst}" + (f"\n{' '.join(notes)}" if notes else ""),
                         fontsize=7)
    fig.suptitle(f"{task.name}: true (o) vs predicted (x); colour = level "
                 f"{', '.join(LEVELS)}; wrong-disc rate {errors['wrong_disc'].mean():.3f} "
                 f"({len(errors)} points)", fontsize=9)
    return save_figure(fig, path)
