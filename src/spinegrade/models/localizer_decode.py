"""Decoding the localizer's heatmaps: peaks, sub-cell refinement and the level order.

Pure numpy (+ OpenCV): the networks run in ``engine/localizer.py``; what their sigmoid
heatmaps mean is decided here. A series is read through :class:`SeriesGeometry`, the part of
``data.localizer.PreparedSeries`` the decoder needs (models never import data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


class SeriesGeometry(Protocol):
    """What decoding needs of a prepared series (``data.localizer.PreparedSeries``)."""

    shapes: np.ndarray
    pixel_spacing: np.ndarray

    def __len__(self) -> int: ...

    def to_native(self, j: int, gx: float, gy: float) -> tuple[float, float]: ...

    def patient_point(self, j: int, x: float, y: float) -> np.ndarray: ...


def cell_to_grid(c: float, stride: int) -> float:
    """Heatmap cell coordinate -> pixel of the S x S grid (cell centres)."""
    return c * stride + (stride - 1) / 2.0


@dataclass(frozen=True)
class Located:
    """Where one keypoint was found in one series.

    Attributes:
        slice_index: position in the spatially ordered stack.
        instance_number: that slice's InstanceNumber.
        x, y: native pixel coordinates on that instance.
        score: peak height (sigmoid) on the chosen slice.
    """

    slice_index: int
    instance_number: int
    x: float
    y: float
    score: float


def soft_argmax(hm: np.ndarray, radius: int, at: tuple[int, int] | None = None
                ) -> tuple[float, float, float]:
    """(x, y, peak) on one heatmap: centroid of the window of ``radius`` around a cell.

    The cell is the heatmap's maximum, or ``at = (row, column)`` when given.
    """
    h, w = hm.shape
    py, px = at if at is not None else np.unravel_index(int(np.argmax(hm)), hm.shape)
    y0, y1, x0, x1 = max(0, py - radius), min(h, py + radius + 1), max(0, px - radius), min(w, px + radius + 1)
    win = hm[y0:y1, x0:x1].astype(np.float64)
    total = win.sum()
    if total <= 0:
        return float(px), float(py), float(hm[py, px])
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return float((win * xs).sum() / total), float((win * ys).sum() / total), float(win.max())


def _disc_candidates(union: np.ndarray, min_sep: float, rel: float = 0.1) -> list[tuple[int, int]]:
    """Local maxima (row, column) of a heatmap, strongest first, at least ``min_sep`` apart."""
    dil = cv2.dilate(union.astype(np.float32), np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero((union >= dil) & (union >= rel * union.max()) & (union > 0))
    order = np.argsort(-union[ys, xs])
    kept: list[tuple[int, int]] = []
    for i in order:
        if all((ys[i] - ky) ** 2 + (xs[i] - kx) ** 2 >= min_sep**2 for ky, kx in kept):
            kept.append((int(ys[i]), int(xs[i])))
    return kept


def ordered_level_cells(hm: np.ndarray, channels: Sequence[int], series: SeriesGeometry,
                        stride: int, min_sep_mm: float = 15.0) -> dict[int, tuple[int, int]] | None:
    """Assign a condition's level channels to consecutive discs along the spine.

    The peaks of all level channels (max over slices) are disc candidates; sorted from
    superior to inferior (patient z, or image rows without geometry), the levels L1/L2 ..
    L5/S1 must be consecutive candidates. The window of candidates with the highest summed
    channel scores wins, so a channel that also fires on a neighbouring disc cannot take it
    when its neighbour explains that disc better. None when there are too few candidates.
    """
    proj = hm[:, list(channels)].max(axis=0)  # (L, h, w)
    j0 = len(series) // 2
    h, w = series.shapes[j0]
    mm_per_cell = float(np.nanmean(series.pixel_spacing[j0])) * max(h, w) / hm.shape[-1]
    if not np.isfinite(mm_per_cell) or mm_per_cell <= 0:
        mm_per_cell = 1.0
    cands = _disc_candidates(proj.max(axis=0), min_sep_mm / mm_per_cell)
    if len(cands) < len(channels):
        return None

    def height(c: tuple[int, int]) -> float:
        gx, gy = cell_to_grid(c[1], stride), cell_to_grid(c[0], stride)
        z = series.patient_point(j0, *series.to_native(j0, gx, gy))[2]
        return float(z) if np.isfinite(z) else -float(c[0])

    cands.sort(key=height, reverse=True)
    n = len(channels)
    sums = [sum(proj[i][cands[s + i]] for i in range(n)) for s in range(len(cands) - n + 1)]
    start = int(np.argmax(sums))
    return {k: cands[start + i] for i, k in enumerate(channels)}
