"""A figure of a few generated studies with their label points, read back from the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from spinegrade.constants import (
    CONDITION_SERIES,
    COORDINATES_CSV,
    LEVEL_TITLE_TO_INDEX,
    LEVELS,
    SERIES_DESCRIPTIONS,
    TITLE_TO_CONDITION,
    TRAIN_CSV,
    train_column,
)
from spinegrade.io.atomic import atomic_path

_COLOURS = {"spinal": "yellow", "left": "lime", "right": "deepskyblue"}


def _read(path: Path) -> np.ndarray:
    """Pixels as the reader will see them: rescaled, MONOCHROME1 inverted."""
    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float32)
    img = img * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = img.max() - img
    return img


def _panels(coords: pd.DataFrame, series: pd.DataFrame) -> list[tuple[str, int, int]]:
    """(description, series_id, instance) of the slices to show for one study."""
    out = []
    for desc in SERIES_DESCRIPTIONS:
        rows = coords[coords.series_id.isin(series[series.series_description == desc].series_id)]
        if rows.empty:
            continue
        if desc == SERIES_DESCRIPTIONS[0]:  # Sagittal T1: one slice per side
            for side in ("Left", "Right"):
                side_rows = rows[rows.condition.str.startswith(side)]
                if not side_rows.empty:
                    r = side_rows.iloc[len(side_rows) // 2]
                    out.append((f"{desc} ({side.lower()})", r.series_id, r.instance_number))
        else:
            r = rows.iloc[len(rows) // 2]
            out.append((desc, r.series_id, r.instance_number))
    return out


def _draw(ax, img: np.ndarray, points: pd.DataFrame, grades: pd.Series, title: str) -> None:
    lo, hi = np.percentile(img, (0.5, 99.5))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    for p in points.itertuples():
        cond = TITLE_TO_CONDITION[p.condition]
        grade = grades.get(train_column(cond, LEVELS[LEVEL_TITLE_TO_INDEX[p.level]]))
        colour = _COLOURS["spinal" if "spinal" in cond else cond.split("_")[0]]
        ax.plot(p.x, p.y, "+", color=colour, ms=9, mew=1.5)
        ax.annotate(f"{p.level} {grade[0] if isinstance(grade, str) else '?'}", (p.x, p.y), color=colour,
                    fontsize=7, xytext=(4, -4), textcoords="offset points")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def save_preview(data_dir: Path, path: Path, n_studies: int = 3) -> Path:
    """Draw the labelled slices of the first training studies; returns the PNG path.

    Points are coloured by condition (spinal yellow, left green, right blue) and tagged with
    level and grade (N/M/S). CONDITION_SERIES decides which series each label sits on.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = pd.read_csv(data_dir / TRAIN_CSV, dtype=str).set_index("study_id")
    coords = pd.read_csv(data_dir / COORDINATES_CSV)
    series = pd.read_csv(data_dir / "train_series_descriptions.csv")
    studies = list(train.index[:n_studies])
    n_cols = len(SERIES_DESCRIPTIONS) + 1
    fig, axes = plt.subplots(len(studies), n_cols, figsize=(4 * n_cols, 4 * len(studies)),
                             squeeze=False)
    for axes_row, study in zip(axes, studies, strict=True):
        c = coords[coords.study_id == int(study)]
        panels = _panels(c, series[series.study_id == int(study)])
        for ax in axes_row:
            ax.set_axis_off()
        for ax, (desc, sid, inst) in zip(axes_row, panels, strict=False):
            img = _read(data_dir / "train_images" / str(study) / str(sid) / f"{inst}.dcm")
            on_slice = c[(c.series_id == sid) & (c.instance_number == inst)]
            _draw(ax, img, on_slice, train.loc[study], f"{study} {desc} #{inst}")
    fig.suptitle("synthetic studies: " + ", ".join(sorted(set(CONDITION_SERIES.values()))),
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path
