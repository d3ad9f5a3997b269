"""Decoding the localizer's heatmaps: peaks, sub-cell refinement and the level order.

Pure numpy (+ OpenCV): the networks run in ``engine/localizer.py``; what their sigmoid
heatmaps mean is decided here. A series is read through :class:`SeriesGeometry`, the part of
``data.localizer.PreparedSeries`` the decoder needs (models never import data).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

# Disc candidates kept for labelling, the strongest first: C(14, 5) = 2002 chains to score,
# and room for two thoracic discs, two sacral lines and a few false peaks beside the five.
MAX_CANDIDATES = 14
# Scores are clipped to [_P_FLOOR, 1 - _P_FLOOR] before their logarithm is taken.
_P_FLOOR = 1e-4
# (points (L, 3) mm, scores (L,)) -> why the chain is not one lumbar spine, or None.
ChainCheck = Callable[[np.ndarray, np.ndarray], "str | None"]


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


def grid_to_cell(g: float, stride: int) -> float:
    """Inverse of :func:`cell_to_grid`."""
    return (g - (stride - 1) / 2.0) / stride


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


@dataclass(frozen=True)
class DiscCandidate:
    """One local maximum of a condition's level channels: a disc, or something that looks like one.

    Attributes:
        cell: (row, column) heatmap cell.
        slice_index: the slice where the level channels peak at that cell.
        point: patient position (mm, LPS) of the cell on that slice; NaN without geometry.
        height: head-to-feet sort key: patient z, or minus the row without geometry.
        disc: how likely the cell is some lumbar disc: :func:`disc_probability` of ``levels``.
        levels: (L,) each level channel's score at the cell (max over slices, 3x3 cells).
    """

    cell: tuple[int, int]
    slice_index: int
    point: np.ndarray
    height: float
    disc: float
    levels: np.ndarray


def disc_probability(levels: np.ndarray) -> float:
    """P(a candidate is one of the lumbar discs) from its level scores (L,).

    A disc is at most one level, so the level events are disjoint and their probabilities
    add (capped at 1): a disc the network cannot place between two neighbouring levels
    (0.3 and 0.3) is still clearly a disc (0.6), where the largest score alone would say 0.3.
    """
    return float(min(1.0, np.sum(levels)))


def mm_per_cell(series: SeriesGeometry, heatmap_side: int) -> float:
    """Millimetres per heatmap cell of the series' middle slice (1.0 without PixelSpacing)."""
    j0 = len(series) // 2
    h, w = series.shapes[j0]
    mm = float(np.nanmean(series.pixel_spacing[j0])) * max(h, w) / heatmap_side
    return mm if np.isfinite(mm) and mm > 0 else 1.0


def disc_candidates(hm: np.ndarray, channels: Sequence[int], series: SeriesGeometry, stride: int,
                    min_sep_mm: float) -> list[DiscCandidate]:
    """Every disc-like peak of ``channels`` (max over slices), ordered head to feet.

    At most ``MAX_CANDIDATES`` (the strongest) are kept, at least ``min_sep_mm`` apart.
    """
    sub = hm[:, list(channels)]                      # (n, L, h, w)
    # 3x3 max: a level channel peaking one cell beside the union's peak still counts there.
    proj = np.stack([cv2.dilate(m.astype(np.float32), np.ones((3, 3), np.uint8))
                     for m in sub.max(axis=0)])      # (L, h, w)
    cells = _disc_candidates(sub.max(axis=(0, 1)), min_sep_mm / mm_per_cell(series, hm.shape[-1]))
    out = []
    for r, c in cells[:MAX_CANDIDATES]:
        j = int(np.argmax(sub[:, :, r, c].max(axis=1)))
        gx, gy = cell_to_grid(c, stride), cell_to_grid(r, stride)
        point = np.asarray(series.patient_point(j, *series.to_native(j, gx, gy)), dtype=np.float64)
        height = float(point[2]) if np.isfinite(point[2]) else -float(r)
        levels = proj[:, r, c].astype(np.float64)
        out.append(DiscCandidate((r, c), j, point, height, disc_probability(levels), levels))
    return sorted(out, key=lambda cand: -cand.height)


def chain_log_score(cands: Sequence[DiscCandidate], chain: Sequence[int]) -> float:
    """Log-likelihood of ``chain`` (candidate indices, head to feet) as L1/L2 .. L5/S1.

    Level k at ``chain[k]`` adds ``log p_k``. Every other candidate below L1/L2 adds
    ``log(1 - disc)``: a real disc strictly inside the chain would mean a skipped level, and
    one below L5/S1 a chain shifted up (nothing below L5/S1 is a lumbar disc: sacral lines
    and false peaks score low there and cost little). Candidates above L1/L2 cost nothing:
    thoracic discs look like lumbar ones, and how many are in view depends on the framing.
    """
    score = sum(math.log(min(max(cands[i].levels[k], _P_FLOOR), 1.0 - _P_FLOOR))
                for k, i in enumerate(chain))
    left_out = set(range(chain[0] + 1, len(cands))) - set(chain)
    return score + sum(math.log(1.0 - min(max(cands[i].disc, _P_FLOOR), 1.0 - _P_FLOOR))
                       for i in left_out)


def label_chain(cands: Sequence[DiscCandidate], n_levels: int,
                check: ChainCheck | None = None) -> tuple[tuple[int, ...] | None, str | None]:
    """The most likely plausible assignment of ``n_levels`` ordered levels to candidates.

    Every increasing choice of ``n_levels`` candidates (head to feet) is scored by
    :func:`chain_log_score`; the best one that ``check`` (points (L, 3), scores (L,)) -> reason
    or None accepts wins.

    Returns:
        ``(candidate indices per level, None)``, or ``(None, reason)`` when there are too few
        candidates or no chain passes ``check``.
    """
    if len(cands) < n_levels:
        return None, f"{len(cands)} disc candidates, {n_levels} levels needed"
    ranked = sorted(itertools.combinations(range(len(cands)), n_levels),
                    key=lambda ch: -chain_log_score(cands, ch))
    first_problem = None
    for chain in ranked:
        if check is None:
            return chain, None
        pts = np.stack([cands[i].point for i in chain])
        problem = check(pts, np.array([cands[i].levels[k] for k, i in enumerate(chain)]))
        if problem is None:
            return chain, None
        first_problem = first_problem or problem
    return None, f"no plausible disc chain ({first_problem})"


def ordered_level_cells(hm: np.ndarray, channels: Sequence[int], series: SeriesGeometry,
                        stride: int, min_sep_mm: float = 15.0, check: ChainCheck | None = None,
                        evidence: Callable[[list[DiscCandidate]], list[DiscCandidate]] | None = None
                        ) -> dict[int, tuple[int, int]] | None:
    """Assign a condition's level channels (L1/L2 .. L5/S1 in order) to discs on the spine.

    The levels are decided together, with the whole spine in view: all disc candidates of the
    stack (:func:`disc_candidates`, including thoracic discs and sacral lines that look like
    discs) are ordered head to feet and :func:`label_chain` picks the five consecutive
    levels that best explain them; ``check`` rejects anatomically implausible chains.
    ``evidence`` may add other series' level scores to the candidates before labelling.

    Returns:
        channel -> (row, column) cell, or None when no chain is found.
    """
    cands = disc_candidates(hm, channels, series, stride, min_sep_mm)
    if evidence is not None:
        cands = evidence(cands)
    chain, _ = label_chain(cands, len(channels), check)
    if chain is None:
        return None
    return {k: cands[i].cell for k, i in zip(channels, chain, strict=True)}


def peak_near(hm: np.ndarray, cell: tuple[float, float], radius: float) -> tuple[int, int, int, float]:
    """The highest value of ``hm`` (n, h, w) within ``radius`` cells of ``cell`` on any slice.

    Returns:
        (slice, row, column, value).
    """
    n, h, w = hm.shape
    rows, cols = np.mgrid[0:h, 0:w]
    inside = (rows - cell[0]) ** 2 + (cols - cell[1]) ** 2 <= radius**2
    if not inside.any():
        inside[int(np.clip(round(cell[0]), 0, h - 1)), int(np.clip(round(cell[1]), 0, w - 1))] = True
    masked = np.where(inside[None], hm, -np.inf)
    j, r, c = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return int(j), int(r), int(c), float(hm[j, r, c])
