"""Percentile bootstrap intervals over clusters (studies), and paired differences.

A leaf module (numpy only). A replicate draws ``n`` clusters with replacement; a statistic
sees the draw as ``multiplicity`` (n,): how many times each cluster was drawn, so any
weighted metric (a weighted log loss, a balanced accuracy from weighted counts) is computed
on the replicate without copying rows. Clusters, not rows, are resampled because the rows
of one study (its levels, its conditions) are not independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

N_BOOT = 1000
LEVEL = 0.95
SEED = 0

Statistic = Callable[[np.ndarray], "float | np.ndarray"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval.

    Attributes:
        estimate: the statistic on the data as they are (every cluster once).
        low, high: the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the
            replicates (NaN replicates, e.g. a draw without any Severe case, are left out).
        level: coverage, e.g. 0.95.
        n_boot: number of replicates.
    """

    estimate: float
    low: float
    high: float
    level: float = LEVEL
    n_boot: int = N_BOOT

    @property
    def contains_zero(self) -> bool:
        """True when the interval cannot tell the statistic from zero (or is undefined)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return True
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (NaN as None)."""
        def num(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {"estimate": num(self.estimate), "low": num(self.low), "high": num(self.high),
                "level": self.level, "n_boot": self.n_boot}

    def format(self, digits: int = 4) -> str:
        """``0.4123 [0.3900, 0.4400]``."""
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def resample_counts(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n) int64: how often each of ``n`` clusters is drawn in each replicate."""
    if n <= 0:
        return np.zeros((n_boot, 0), dtype=np.int64)
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.int64)


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percentiles of ``replicates`` (NaN left out; NaN, NaN if nothing is left)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(r, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap(stat: Statistic, n_clusters: int, *, n_boot: int = N_BOOT, seed: int = SEED,
              level: float = LEVEL) -> list[Interval]:
    """Intervals of each component of ``stat`` over ``n_boot`` cluster resamples.

    Args:
        stat: ``stat(multiplicity) -> float or (k,) array``; ``multiplicity`` (n_clusters,)
            counts how often each cluster is in the replicate (all ones for the estimate).
        n_clusters: number of clusters (e.g. studies).
        n_boot, seed, level: replicates, their seed, and the interval's coverage.

    Returns:
        One :class:`Interval` per component of ``stat``.
    """
    estimate = np.atleast_1d(np.asarray(stat(np.ones(n_clusters)), dtype=np.float64))
    counts = resample_counts(n_clusters, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.array([np.atleast_1d(np.asarray(stat(c), dtype=np.float64)) for c in counts])
    reps = reps.reshape(n_boot, len(estimate))
    return [Interval(float(estimate[j]), *percentile_interval(reps[:, j], level), level, n_boot)
            for j in range(len(estimate))]


def mean_std(values) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of the finite values;
    both None when there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def cluster_codes(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer code (0..n-1) of each row's cluster id, and the number of clusters."""
    _, codes = np.unique(np.asarray(ids).astype(str), return_inverse=True)
    return codes.astype(np.int64), int(codes.max()) + 1 if len(codes) else 0


def paired_difference(metric: Callable[[np.ndarray], float], metric_ref: Callable[[np.ndarray], float],
                      clusters: np.ndarray, *, n_boot: int = N_BOOT, seed: int = SEED,
                      level: float = LEVEL) -> Interval:
    """``metric - metric_ref`` on the same rows, both drawn with the same cluster resamples.

    Args:
        metric, metric_ref: ``f(row_weights (n,)) -> float`` for the two models, evaluated on
            the shared rows (row ``i`` of both is the same sample).
        clusters: (n,) cluster id of each shared row (e.g. its study).
    """
    codes, n = cluster_codes(clusters)

    def stat(m: np.ndarray) -> float:
        w = m[codes]
        return metric(w) - metric_ref(w)

    return bootstrap(stat, n, n_boot=n_boot, seed=seed, level=level)[0]
