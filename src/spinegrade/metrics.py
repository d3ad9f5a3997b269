"""Metrics of the engines: pure numpy/pandas, no torch, no scikit-learn.

Classification:

``confusion_matrix``, ``per_class_recall``, ``balanced_accuracy``, ``prediction_counts``,
``weighted_log_loss`` and ``summarize`` take complete arrays: under DDP gather the
predictions first (and drop sampler padding); confusion matrices add across shards. The
log loss clips and renormalises as the competition's scikit-learn (2024) did, so it equals
the competition's per-group loss; the competition score itself lives in
``spinegrade.competition``.

Localisation (the localizer, in millimetres): ``keypoint_errors`` (truth vs prediction per
labelled keypoint), ``wrong_disc`` / ``wrong_disc_rate`` (a point nearer another level's
true disc than its own), ``summarize_errors`` (per level and overall) and ``selection_score``
(what picks the localizer's best checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from spinegrade.constants import CLASS_NAMES, CLASS_WEIGHTS, LEVELS, NUM_CLASSES
from spinegrade.io.geometry import slice_normal

EPS: float = float(np.finfo(np.float64).eps)
# 3D errors are clipped here when averaged for checkpoint selection (a miss is a miss).
ERROR_CLIP_MM = 50.0
# keypoint_errors: the true and the predicted point in patient coordinates (mm, LPS).
TRUE_POINT = ("true_px", "true_py", "true_pz")
PRED_POINT = ("pred_px", "pred_py", "pred_pz")


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     num_classes: int = NUM_CLASSES, weights: np.ndarray | None = None
                     ) -> np.ndarray:
    """Confusion matrix counts: rows are true classes, columns predicted classes.

    Args:
        y_true: integer labels in ``[0, num_classes)``.
        y_pred: integer predictions in ``[0, num_classes)``, same length.
        num_classes: K.
        weights: optional (N,) weight per sample (e.g. bootstrap multiplicities).

    Returns:
        (K, K) int64 array (float64 with ``weights``). Matrices of disjoint shards add up to
        the whole set's matrix.

    Raises:
        ValueError: on mismatched lengths or labels outside ``[0, num_classes)``.
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes})")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes,
                         weights=None if weights is None else np.asarray(weights, np.float64))
    return counts.reshape(num_classes, num_classes)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class, ``cm[k, k] / cm[k].sum()``.

    Args:
        cm: (K, K) confusion matrix, rows true.

    Returns:
        (K,) float array; NaN for a class absent from ``y_true`` (its recall is undefined,
        not zero), with no runtime warning.
    """
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1)
    out = np.full(len(cm), np.nan)
    np.divide(np.diag(cm), support, out=out, where=support > 0)
    return out


def balanced_accuracy(cm_or_y_true: np.ndarray | Sequence[int],
                      y_pred: np.ndarray | Sequence[int] | None = None,
                      num_classes: int = NUM_CLASSES) -> float:
    """Mean recall over the classes present in ``y_true`` (as sklearn's balanced_accuracy_score).

    Args:
        cm_or_y_true: a (K, K) confusion matrix when ``y_pred`` is None, else true labels.
        y_pred: predicted labels, or None.
        num_classes: K, used when labels are given.

    Returns:
        The balanced accuracy; NaN when there are no samples.
    """
    if y_pred is None:
        cm = np.asarray(cm_or_y_true)
    else:
        cm = confusion_matrix(cm_or_y_true, y_pred, num_classes)
    recall = per_class_recall(cm)
    return float(np.mean(recall[~np.isnan(recall)])) if np.any(~np.isnan(recall)) else float("nan")


def prediction_counts(y_pred: np.ndarray | Sequence[int],
                      num_classes: int = NUM_CLASSES) -> np.ndarray:
    """How many times each class was predicted: (K,) int64 array."""
    return np.bincount(np.asarray(y_pred, dtype=np.int64).ravel(), minlength=num_classes)


def clip_renormalise(probs: np.ndarray) -> np.ndarray:
    """Clip to ``[EPS, 1 - EPS]`` then make each row sum to one, as sklearn's log_loss (2024)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    return p / p.sum(axis=1, keepdims=True)


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """``sum(w * v) / sum(w)``; NaN when the weights sum to zero (nothing to score)."""
    total = float(np.sum(weights))
    return float(np.dot(values, weights) / total) if total > 0 else float("nan")


def sample_weights(y_true: np.ndarray | Sequence[int],
                   class_weights: Sequence[float] = CLASS_WEIGHTS) -> np.ndarray:
    """Per-sample weights ``class_weights[y]``: the competition's 1/2/4 by true severity."""
    return np.asarray(class_weights, dtype=np.float64)[np.asarray(y_true, dtype=np.int64)]


def weighted_log_loss(y_true: np.ndarray | Sequence[int], probs: np.ndarray,
                      weights: Sequence[float] = CLASS_WEIGHTS) -> float:
    """The competition's per-group loss on integer labels.

    Each sample is weighted by ``weights[y_true]``; probabilities are clipped to
    ``[EPS, 1 - EPS]`` and each row renormalised; the loss is
    ``sum(w_i * -log p_i[y_i]) / sum(w_i)``.

    Args:
        y_true: (N,) integer labels.
        probs: (N, K) probabilities (rows need not sum to one).
        weights: (K,) weight per true class.

    Returns:
        The weighted mean negative log-likelihood; NaN when there are no samples.

    Raises:
        ValueError: when ``probs`` is not (N, K) for N labels.
    """
    y = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be (N, K) with N = {len(y)} labels, got {p.shape}")
    p = clip_renormalise(p)
    return weighted_mean(-np.log(p[np.arange(len(y)), y]), sample_weights(y, weights))


def summarize(y_true: np.ndarray | Sequence[int], probs: np.ndarray) -> dict:
    """Every engine metric for one evaluation, as plain Python values.

    Args:
        y_true: (N,) integer labels.
        probs: (N, K) predicted probabilities; the prediction is their argmax.

    Returns:
        ``balanced_accuracy`` (float), ``recall`` ({class name: float}), ``confusion_matrix``
        (list of K lists, rows true), ``prediction_counts`` ({class name: int}),
        ``weighted_logloss`` (float) and ``n_samples`` (int). Undefined values (the recall
        of a class absent from ``y_true``, anything on zero samples) are ``float('nan')``,
        so every value stays a number (``json.dumps`` writes NaN; pandas writes an empty
        CSV cell); consumers comparing recalls must treat NaN as "no such samples".
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64).ravel()
    k = probs.shape[1] if probs.ndim == 2 else NUM_CLASSES
    y_pred = probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(y, y_pred, k)
    names = CLASS_NAMES if k == len(CLASS_NAMES) else tuple(str(i) for i in range(k))
    return {
        "balanced_accuracy": float(balanced_accuracy(cm)),
        "recall": {n: float(r) for n, r in zip(names, per_class_recall(cm), strict=True)},
        "confusion_matrix": cm.tolist(),
        "prediction_counts": {n: int(c) for n, c in zip(names, prediction_counts(y_pred, k), strict=True)},
        "weighted_logloss": float(weighted_log_loss(y, probs.reshape(len(y), k))),
        "n_samples": len(y),
    }


# --- localisation ------------------------------------------------------------------------------


def keypoint_errors(labelled: Sequence[Any], predicted: Sequence[Sequence[Any]], task: Any
                    ) -> pd.DataFrame:
    """Truth vs prediction for every labelled keypoint of held-out series.

    ``labelled`` are ``data.localizer.SeriesLabels``, ``predicted`` one list of
    ``models.localizer_decode.Located`` per series (one per channel), ``task`` their
    ``LocalizerTask``.

    Point error is measured in the plane of the true slice (in mm, via PixelSpacing and the
    slice positions, so a neighbouring slice's prediction is compared at the same anatomy);
    ``error_3d_mm`` adds the out-of-plane distance; ``slice_error`` counts stack positions.
    """
    rows = []
    for lab, locs in zip(labelled, predicted, strict=True):
        s = lab.series
        for k in np.flatnonzero(lab.mask):
            tj, loc = int(lab.slice_idx[k]), locs[k]
            tx, ty = s.to_native(tj, *lab.xy[k])
            p_true, p_pred = s.patient_point(tj, tx, ty), s.patient_point(loc.slice_index, loc.x, loc.y)
            d = p_pred - p_true
            if np.all(np.isfinite(d)):
                normal = slice_normal(s.slice_orientation(tj))
                in_plane = float(np.linalg.norm(d - (d @ normal) * normal))
                err3d = float(np.linalg.norm(d))
            else:  # no geometry: compare pixels on the true slice's spacing
                sp = s.pixel_spacing[tj]
                in_plane = err3d = float(math.hypot((loc.x - tx) * sp[1], (loc.y - ty) * sp[0]))
            cond, lvl = task.keypoints[k]
            rows.append({"study_id": s.study_id, "series_id": s.series_id,
                         "series_description": task.series_description, "condition": cond,
                         "level": LEVELS[lvl], "true_instance": int(s.instance_numbers[tj]),
                         "pred_instance": loc.instance_number, "true_x": tx, "true_y": ty,
                         "pred_x": loc.x, "pred_y": loc.y, "score": loc.score,
                         "slice_error": loc.slice_index - tj, "error_mm": in_plane,
                         "error_3d_mm": err3d,
                         **dict(zip(TRUE_POINT, p_true, strict=True)),
                         **dict(zip(PRED_POINT, p_pred, strict=True))})
    return pd.DataFrame(rows)


def wrong_disc(errors: pd.DataFrame) -> pd.Series:
    """Per row of :func:`keypoint_errors`: is the predicted point nearer another level's disc?

    A prediction of level k is on the wrong disc when it lies closer to the true point of some
    other level m of the same condition in the same study than to level k's own true point.
    Distances are 3D in patient coordinates (so levels labelled on different series of one
    study still compare); rows without geometry compare native pixels within their series.
    Rows whose group has no other level are never wrong.

    Returns:
        Boolean Series aligned with ``errors``.
    """
    out = pd.Series(False, index=errors.index)
    if errors.empty:
        return out
    for _, g in errors.groupby(["study_id", "condition"], sort=False):
        if g["level"].nunique() < 2:
            continue
        has_3d = np.isfinite(g[list(TRUE_POINT) + list(PRED_POINT)].to_numpy(float)).all()
        pred_cols, true_cols = ((PRED_POINT, TRUE_POINT) if has_3d
                                else (("pred_x", "pred_y"), ("true_x", "true_y")))
        for i, row in g.iterrows():
            same = g if has_3d else g[g["series_id"] == row["series_id"]]
            pred = row[list(pred_cols)].to_numpy(float)
            dist = np.linalg.norm(same[list(true_cols)].to_numpy(float) - pred, axis=1)
            own = dist[(same["level"] == row["level"]).to_numpy()].min()
            others = dist[(same["level"] != row["level"]).to_numpy()]
            out[i] = bool(others.size and others.min() < own)
    return out


def wrong_disc_rate(errors: pd.DataFrame) -> float:
    """Share of the points of ``errors`` that :func:`wrong_disc` flags (NaN when empty)."""
    return float(wrong_disc(errors).mean()) if len(errors) else math.nan


def summarize_errors(errors: pd.DataFrame, by: Sequence[str] = ("condition", "level")
                     ) -> pd.DataFrame:
    """Per group and overall: the median and 90th-percentile point error (mm, in the true
    slice's plane), the exact and +-1 slice accuracy and the wrong-disc rate.

    The wrong-disc flags are computed over the whole of ``errors`` (each point against every
    level of its study), then averaged per group.
    """

    def stats(g: pd.DataFrame) -> dict:
        se = g["slice_error"].abs()
        return {"n": len(g), "median_mm": float(g["error_mm"].median()),
                "p90_mm": float(g["error_mm"].quantile(0.9)),
                "slice_exact": float((se == 0).mean()), "slice_within1": float((se <= 1).mean()),
                "wrong_disc_rate": float(g["wrong_disc"].mean())}

    if errors.empty:
        return pd.DataFrame(columns=[*by, "n", "median_mm", "p90_mm", "slice_exact",
                                     "slice_within1", "wrong_disc_rate"])
    errors = errors.assign(wrong_disc=wrong_disc(errors))
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), **stats(g)}
            for key, g in errors.groupby(list(by), sort=False)]
    rows.append({**{b: "all" for b in by}, **stats(errors)})
    return pd.DataFrame(rows)


def selection_score(errors: pd.DataFrame) -> float:
    """Mean 3D error with misses clipped (lower is better): slice and point error in one."""
    if errors.empty:
        return float("inf")
    return float(errors["error_3d_mm"].clip(upper=ERROR_CLIP_MM).mean())
