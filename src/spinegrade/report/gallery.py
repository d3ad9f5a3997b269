"""A gallery of cached crops: a few samples per class, every slice and window visible.

Each sample is drawn as one mosaic: one row per window channel, one column per slice
(offset from the labeled slice), captioned with class, level and study. Matplotlib, headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from spinegrade.constants import LEVEL_TITLES, SEVERITIES  # noqa: E402
from spinegrade.io.atomic import atomic_path  # noqa: E402

GAP = 2  # pixels of blank between the tiles of a mosaic


def channel_names(data_cfg: dict) -> tuple[str, str, str]:
    """Short names of the three window channels of a cache made with ``data_cfg``."""
    if data_cfg.get("window_preset") == "percentile":
        lo, hi = (f"p{a:g}-{b:g}" for a, b in data_cfg["percentile_windows"][:2])
        return lo, hi, "file"
    return "soft", "bone", "file"


def pick_samples(index: pd.DataFrame, per_class: int, seed: int = 0) -> dict[int, list[int]]:
    """Up to ``per_class`` random cache rows of each class, sorted by level then study."""
    rng = np.random.default_rng(seed)
    out: dict[int, list[int]] = {}
    for label in range(len(SEVERITIES)):
        rows = index.loc[index["label"] == label]
        take = rows.iloc[rng.permutation(len(rows))[:per_class]]
        out[label] = take.sort_values(["level_idx", "study_id"])["row"].astype(int).tolist()
    return out


def mosaic(crop: np.ndarray) -> np.ndarray:
    """(S, C, H, W) uint8 -> float (C*H + gaps, S*W + gaps) grid; gaps are NaN."""
    s, c, h, w = crop.shape
    out = np.full((c * (h + GAP) - GAP, s * (w + GAP) - GAP), np.nan, dtype=np.float32)
    for ci in range(c):
        for si in range(s):
            out[ci * (h + GAP):ci * (h + GAP) + h, si * (w + GAP):si * (w + GAP) + w] = crop[si, ci]
    return out


def _draw(ax: plt.Axes, crop: np.ndarray, caption: str, names: Sequence[str], bottom: bool) -> None:
    s, c, h, w = crop.shape
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(mosaic(crop), cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(caption, fontsize=9)
    ax.set_yticks([ci * (h + GAP) + h / 2 for ci in range(c)], list(names)[:c], fontsize=7)
    centre = s // 2
    ax.set_xticks([si * (w + GAP) + w / 2 for si in range(s)],
                  [f"{si - centre:+d}" if si != centre else "0" for si in range(s)] if bottom
                  else [], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def make_gallery(crops: np.ndarray, index: pd.DataFrame, out: str | Path, per_class: int = 5,
                 names: Sequence[str] = ("soft", "bone", "file"), seed: int = 0,
                 title: str = "") -> Path:
    """Write a PNG with ``per_class`` samples of each class (columns: classes).

    Args:
        crops: (N, S, 3, H, W) uint8 (a cache's memmap).
        index: the cache index (``row``, ``label``, ``level_idx``, ``study_id``).
        out: PNG path, written atomically.
        per_class: samples per class (fewer where a class has fewer).
        names: the window channel names, top to bottom.
        seed: which samples are drawn.
        title: figure title.
    """
    picked = pick_samples(index, per_class, seed)
    by_row = index.set_index("row")
    s, _, h, w = crops.shape[1:]
    aspect = (3 * h) / (s * w)
    ncols, nrows = len(SEVERITIES), max(1, per_class)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 6.2 * aspect * nrows + 0.8),
                             squeeze=False)
    for label, rows in picked.items():
        for i in range(nrows):
            ax = axes[i, label]
            if i >= len(rows):
                ax.axis("off")
                continue
            r = by_row.loc[rows[i]]
            caption = (f"{SEVERITIES[label]} | {LEVEL_TITLES[int(r['level_idx'])]} | "
                       f"study {int(r['study_id'])} (row {rows[i]})")
            _draw(ax, np.asarray(crops[rows[i]]), caption, names, bottom=i == nrows - 1)
    fig.suptitle(title or f"{per_class} samples per class: rows = windows, columns = slice offset",
                 fontsize=11)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
