"""Reliability diagrams and the expected calibration error (ECE) of class probabilities.

A leaf module (numpy). Plain arrays: ``probs`` (n, K), integer ``labels`` (n,) in ``[0, K)``,
optional sample ``weights`` (n,); with the competition's 1/2/4 weights a bin's accuracy is
the reweighted frequency (see ``spinegrade.calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 10


def checked_arrays(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 (n, K) scores, int64 (n,) labels and float64 (n,) weights."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).ravel()
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"expected (n, K) scores for {len(y)} labels, got shape {z.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must be integers in [0, {z.shape[1]}), got {np.unique(y)[:5]}")
    if not np.all(np.isfinite(z)):
        raise ValueError("scores contain NaN or infinite values")
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != y.shape or not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError(f"weights must be {len(y)} finite non-negative numbers")
    return z, y.astype(np.int64), w



@dataclass(frozen=True)
class ReliabilityBins:
    """A reliability diagram's data: equal-width confidence bins on [0, 1].

    Bin ``b`` holds confidences in ``(edges[b], edges[b + 1]]`` (the first also holds 0).
    ``confidence`` and ``accuracy`` are (weighted) means over the bin, NaN when it is empty;
    ``count`` is the number of samples, ``weight`` their summed weight.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    weight: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum_b weight_b / W * |accuracy_b - confidence_b|``."""
        total = self.weight.sum()
        if total <= 0:
            return float("nan")
        full = self.weight > 0
        gaps = np.abs(self.accuracy[full] - self.confidence[full])
        return float(np.dot(self.weight[full], gaps) / total)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS,
                     weights: np.ndarray | None = None, class_index: int | None = None
                     ) -> ReliabilityBins:
    """Bin predictions by confidence and compare with the observed frequency.

    Args:
        probs: (n, K) probabilities.
        labels: (n,) true classes.
        n_bins: number of equal-width bins.
        weights: (n,) sample weights; None: all 1.
        class_index: None: top-label confidence ``max_k p_k`` against ``argmax == label``;
            k: the probability of class k against ``label == k`` (classwise).
    """
    p, y, w = checked_arrays(probs, labels, weights)
    if class_index is None:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y)
    else:
        conf, hit = p[:, class_index], (y == class_index)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.digitize(conf, edges[1:-1], right=True)
    weight = np.bincount(idx, weights=w, minlength=n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=w * conf, minlength=n_bins) / weight
        accuracy = np.bincount(idx, weights=w * hit, minlength=n_bins) / weight
    empty = weight <= 0
    confidence[empty], accuracy[empty] = np.nan, np.nan
    return ReliabilityBins(edges, confidence, accuracy, count, weight)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """(K,) ECE of each class's probability against that class's indicator."""
    k = np.asarray(probs).shape[1]
    return np.array([reliability_bins(probs, labels, n_bins, weights, c).ece for c in range(k)])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               n_bins: int = DEFAULT_BINS, weights: np.ndarray | None = None,
                               classwise: bool = False) -> float:
    """Top-label ECE, or with ``classwise`` the mean of :func:`classwise_ece` over classes."""
    if classwise:
        return float(np.mean(classwise_ece(probs, labels, n_bins, weights)))
    return reliability_bins(probs, labels, n_bins, weights).ece
