"""Engine classification metrics against sklearn."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import sklearn.metrics as skm

from spinegrade import metrics
from spinegrade.constants import CLASS_NAMES, CLASS_WEIGHTS


@pytest.mark.parametrize("seed", range(4))
def test_confusion_recall_balanced_accuracy_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, 200)
    if seed == 3:  # a class absent from y_true: recall undefined, BA over present classes
        y_true[y_true == 2] = 1
    y_pred = rng.integers(0, 3, 200)
    cm = metrics.confusion_matrix(y_true, y_pred)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2]))
    np.testing.assert_allclose(
        metrics.per_class_recall(cm),
        skm.recall_score(y_true, y_pred, labels=[0, 1, 2], average=None, zero_division=np.nan),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the absent class
        expected = skm.balanced_accuracy_score(y_true, y_pred)
    assert metrics.balanced_accuracy(cm) == pytest.approx(expected, abs=1e-12)
    assert metrics.balanced_accuracy(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(metrics.prediction_counts(y_pred), np.bincount(y_pred, minlength=3))


def test_confusion_matrix_adds_over_shards_and_rejects_bad_labels():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    whole = metrics.confusion_matrix(t, p)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(t[:40], p[:40]) + metrics.confusion_matrix(t[40:], p[40:]), whole)
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix([0, 3], [0, 1])
    assert np.isnan(metrics.balanced_accuracy(np.zeros((3, 3))))


@pytest.mark.parametrize("seed", range(3))
def test_weighted_log_loss_equals_sklearn_on_normalised_probabilities(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet([1.0, 1.0, 1.0], 300)
    w = np.asarray(CLASS_WEIGHTS)[y]
    expected = skm.log_loss(y, p, sample_weight=w, labels=[0, 1, 2])
    assert metrics.weighted_log_loss(y, p) == pytest.approx(expected, abs=1e-12)


def test_weighted_log_loss_clips_and_renormalises():
    eps = np.finfo(np.float64).eps
    y = np.array([0, 1, 2])
    # Unnormalised; above 1 (clipped first, so [5, 3, 2] becomes uniform); a hard zero on the
    # truth ([1, 0, 0] clips to [1 - eps, eps, eps], which sums to 1 + eps).
    raw = np.array([[0.4, 0.2, 0.2], [5.0, 3.0, 2.0], [1.0, 0.0, 0.0]])
    expected = (-math.log(0.5) + 2 * math.log(3) + 4 * -math.log(eps / (1 + eps))) / 7
    assert metrics.weighted_log_loss(y, raw) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(metrics.weighted_log_loss([], np.zeros((0, 3))))


def test_summarize_gives_plain_values():
    y = np.array([0, 0, 1, 1])  # no severe: its recall is undefined
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    s = metrics.summarize(y, probs)
    assert set(s) == {"balanced_accuracy", "recall", "confusion_matrix", "prediction_counts",
                      "weighted_logloss", "n_samples"}
    assert [s["recall"][c] for c in CLASS_NAMES[:2]] == [0.5, 0.5]
    assert math.isnan(s["recall"][CLASS_NAMES[2]])
    assert s["balanced_accuracy"] == 0.5
    assert s["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert s["prediction_counts"] == {CLASS_NAMES[0]: 1, CLASS_NAMES[1]: 2, CLASS_NAMES[2]: 1}
    assert s["weighted_logloss"] == pytest.approx(metrics.weighted_log_loss(y, probs))
    assert s["n_samples"] == 4
    assert json.loads(json.dumps(s))["n_samples"] == 4
