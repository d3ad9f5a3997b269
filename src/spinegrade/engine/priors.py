"""The per-level class prior of a run's training labels: one function for fit and apply.

``predict`` gives it to levels it cannot grade and mixes it into every grade by the weight
``calibrate`` chose out of fold against the very same prior (``calibration.json`` stores
it), so the weight is fitted and applied against one set of numbers: the training counts
of each level, add-one smoothed, reweighted by [1, 2, 4] with ``predict.prior_reweight``
and floored at ``PRIOR_FLOOR`` (see ``constants``; no exact zero, which would cost ~34
nats where the prior is wrong). A level without training labels borrows the overall counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from spinegrade.competition import class_prior
from spinegrade.constants import (
    CLASS_BALANCE,
    LEVELS,
    NUM_CLASSES,
    PRIOR_FLOOR,
    PRIOR_PSEUDO_COUNT,
)


def prior_probs(counts: np.ndarray, reweight: bool, pseudo_count: float = PRIOR_PSEUDO_COUNT
                ) -> np.ndarray:
    """The fallback prior: :func:`~spinegrade.competition.class_prior` of counts (..., 3)
    add-one smoothed, reweighted and floored at ``PRIOR_FLOOR`` (see ``constants``)."""
    return class_prior(counts, reweight=reweight, pseudo_count=pseudo_count, floor=PRIOR_FLOOR)


def default_prior(condition: str, reweight: bool) -> np.ndarray:
    """(5, 3) prior of a condition from ``CLASS_BALANCE`` (the same at every level).

    The balance is a frequency, not a count: no pseudo count, only the floor."""
    prior = prior_probs(np.asarray(CLASS_BALANCE[condition]), reweight, pseudo_count=0.0)
    return np.tile(prior, (len(LEVELS), 1))


def level_counts(levels: Sequence[int], labels: Sequence[int]) -> np.ndarray:
    """(5, 3) label counts per level index; a level without labels borrows the overall counts."""
    counts = np.zeros((len(LEVELS), NUM_CLASSES))
    np.add.at(counts, (np.asarray(levels, dtype=np.int64), np.asarray(labels, dtype=np.int64)), 1)
    counts[counts.sum(axis=1) == 0] = counts.sum(axis=0)
    return counts


def level_prior(levels: Sequence[int], labels: Sequence[int], reweight: bool) -> np.ndarray:
    """(5, 3) per-level prior of training labels: :func:`prior_probs` of :func:`level_counts`
    (``levels`` are indices into ``LEVELS``)."""
    return prior_probs(level_counts(levels, labels), reweight)


def rows_prior(rows: pd.DataFrame, reweight: bool) -> np.ndarray | None:
    """:func:`level_prior` of a crop index's rows (``level`` names, ``label``); rows of an
    unknown level are ignored; None when no row is left."""
    idx = rows["level"].map({name: i for i, name in enumerate(LEVELS)})
    known = idx.notna().to_numpy()
    if not known.any():
        return None
    return level_prior(idx[known].to_numpy(dtype=np.int64),
                       rows["label"].to_numpy(dtype=np.int64)[known], reweight)
