"""Grades, latent narrowing and empty cells of the synthetic studies; the CSV tables."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spinegrade.constants import (
    CLASS_BALANCE,
    CLASS_WEIGHTS,
    CONDITIONS,
    LEVELS,
    NUM_CLASSES,
    NUM_LEVELS,
    SEVERITIES,
    SOLUTION_WEIGHT_COLUMN,
    SPINAL_LEVEL_COUNTS,
    SUBMISSION_COLUMNS,
    TRAIN_COLUMNS,
    row_id,
)
from spinegrade.errors import UserError

EMPTY = -1  # grade code of an empty label cell
# Latent narrowing drawn uniformly from these ranges per grade; neighbours overlap a little,
# so a few cases are ambiguous, as with real readers (difficulty "easy", the default).
GRADE_RANGES: tuple[tuple[float, float], ...] = ((0.0, 0.34), (0.30, 0.62), (0.58, 0.95))


@dataclass(frozen=True)
class Difficulty:
    """How separable the grades are: latent ranges per grade and the label-noise rate.

    ``label_noise`` is the chance that a label cell names a neighbouring grade instead of the
    one the anatomy shows (Moderate goes to the neighbour its latent narrowing is nearer),
    as when one reader's call differs from the truth. Two readers with noise r each agree
    on about 1 - 2r of the cells.
    """

    grade_ranges: tuple[tuple[float, float], ...]
    label_noise: float


# FACTS.md gives no inter-reader figure for the competition's labels (only "label noise
# exists"). Published 3-grade lumbar stenosis readings agree with weighted kappa of about
# 0.65-0.69 between two radiologists (Eur Spine J 2014;23:1320, PMID 24573778) and
# "moderate to substantial" in Lurie et al., Spine 2008;33:1605. With 10% noise per reader
# two readers agree on ~80% of cells: kappa ~0.67 at the demo's 50/30/20 balance
# ("realistic"). "hard" doubles it (two readers ~64%, kappa ~0.4, the low end reported for
# foraminal grading) and widens the overlap so a CPU-sized model cannot separate the
# Moderate class by brightness alone.
DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(GRADE_RANGES, 0.0),
    "realistic": Difficulty(((0.0, 0.40), (0.26, 0.68), (0.52, 0.95)), 0.10),
    "hard": Difficulty(((0.0, 0.46), (0.22, 0.74), (0.46, 0.95)), 0.20),
}
# Chance that a label cell is empty, per condition kind and level (real data: 572 of 49,375
# cells, mostly subarticular L1/L2 and L2/L3).
_EMPTY_SUBARTICULAR = (0.08, 0.03, 0.004, 0.004, 0.004)
_EMPTY_OTHER = 0.002


def resolve_balance(
    class_balance: Mapping[str, Sequence[float]] | None,
) -> dict[str, np.ndarray]:
    """Per-condition, per-level grade probabilities, shape ``(NUM_LEVELS, 3)`` each.

    Defaults follow the real data (``CLASS_BALANCE``; spinal per level shaped like
    ``SPINAL_LEVEL_COUNTS``). An entry of ``class_balance`` (condition -> three weights,
    normalised here) replaces that condition's default at every level.

    Raises:
        UserError: unknown condition, or weights that are not three non-negative numbers
            with a positive sum.
    """
    out = {c: np.tile(np.asarray(CLASS_BALANCE[c], float), (NUM_LEVELS, 1)) for c in CONDITIONS}
    spinal = np.array([SPINAL_LEVEL_COUNTS[lv] for lv in LEVELS], float)
    out[CONDITIONS[0]] = spinal / spinal.sum(axis=1, keepdims=True)
    for cond, probs in (class_balance or {}).items():
        if cond not in CONDITIONS:
            raise UserError(f"class balance: unknown condition '{cond}'; expected one of "
                            f"{', '.join(CONDITIONS)}")
        p = np.asarray(list(probs), float)
        if p.shape != (NUM_CLASSES,) or (p < 0).any() or not p.sum() > 0:
            raise UserError(f"class balance for {cond}: expected {NUM_CLASSES} non-negative "
                            f"weights ({', '.join(SEVERITIES)}) with a positive sum, got {list(probs)}")
        out[cond] = np.tile(p / p.sum(), (NUM_LEVELS, 1))
    for cond in CONDITIONS:
        out[cond] = out[cond] / out[cond].sum(axis=1, keepdims=True)
    return out


def sample_grades(rng: np.random.Generator, balance: dict[str, np.ndarray]) -> np.ndarray:
    """Grades (0..2) of one study, shape ``(len(CONDITIONS), NUM_LEVELS)``."""
    u = rng.random((len(CONDITIONS), NUM_LEVELS))
    grades = np.empty(u.shape, dtype=np.int64)
    for i, cond in enumerate(CONDITIONS):
        cum = np.cumsum(balance[cond], axis=1)
        grades[i] = np.minimum((u[i][:, None] > cum).sum(axis=1), NUM_CLASSES - 1)
    return grades


def sample_latent(rng: np.random.Generator, grades: np.ndarray,
                  ranges: Sequence[tuple[float, float]] = GRADE_RANGES) -> np.ndarray:
    """Continuous narrowing in [0, 1] for each grade, from the overlapping ``ranges``."""
    lo = np.array([ranges[g][0] for g in grades.ravel()]).reshape(grades.shape)
    hi = np.array([ranges[g][1] for g in grades.ravel()]).reshape(grades.shape)
    return lo + (hi - lo) * rng.random(grades.shape)


def reader_labels(rng: np.random.Generator, grades: np.ndarray, latent: np.ndarray,
                  difficulty: Difficulty) -> np.ndarray:
    """The grades a reader writes down: each moved to a neighbour with ``label_noise``.

    Normal/Mild and Severe have one neighbour; Moderate goes down when its latent narrowing
    lies below the middle of its range, else up (readers disagree near a boundary).
    """
    if difficulty.label_noise <= 0:
        return grades.copy()
    flip = rng.random(grades.shape) < difficulty.label_noise
    lo, hi = difficulty.grade_ranges[1]
    moderate_step = np.where(latent < (lo + hi) / 2, -1, 1)
    step = np.where(grades == 0, 1, np.where(grades == NUM_CLASSES - 1, -1, moderate_step))
    return np.where(flip, grades + step, grades)


def sample_empty(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Boolean mask of empty label cells, shape ``(len(CONDITIONS), NUM_LEVELS)``."""
    p = np.full((len(CONDITIONS), NUM_LEVELS), _EMPTY_OTHER)
    for i, cond in enumerate(CONDITIONS):
        if "subarticular" in cond:
            p[i] = _EMPTY_SUBARTICULAR
    return rng.random(p.shape) < p * scale


def _csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    buf.write(",".join(header) + "\n")
    for row in rows:
        buf.write(",".join("" if v is None else str(v) for v in row) + "\n")
    return buf.getvalue()


def train_csv(studies: Sequence[tuple[int, np.ndarray]]) -> str:
    """``train.csv`` text for (study_id, grades with EMPTY) pairs."""
    rows = []
    for study_id, grades in studies:
        cells = [SEVERITIES[g] if g != EMPTY else None for g in grades.ravel()]
        rows.append([study_id, *cells])
    return _csv(TRAIN_COLUMNS, rows)


def solution_csv(studies: Sequence[tuple[int, np.ndarray]]) -> str:
    """Competition solution: one-hot truth and sample weight; empty cells are left out."""
    rows = []
    for study_id, grades in studies:
        for (ci, li), g in np.ndenumerate(grades):
            if g == EMPTY:
                continue  # unscored in the competition, so not part of the solution
            onehot = [int(k == g) for k in range(NUM_CLASSES)]
            rows.append([row_id(study_id, CONDITIONS[ci], LEVELS[li]), *onehot,
                         CLASS_WEIGHTS[g]])
    return _csv((*SUBMISSION_COLUMNS, SOLUTION_WEIGHT_COLUMN), rows)


def sample_submission_csv(study_ids: Sequence[int]) -> str:
    """Uniform 1/3 predictions for every row of the given studies (the Kaggle sample)."""
    third = f"{1 / NUM_CLASSES:.6f}"
    rows = [[row_id(s, c, lv), *([third] * NUM_CLASSES)]
            for s in study_ids for c in CONDITIONS for lv in LEVELS]
    return _csv(SUBMISSION_COLUMNS, rows)


def table_csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Any other table (coordinates, series descriptions) as CSV text."""
    return _csv(header, rows)
