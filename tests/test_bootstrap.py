"""Percentile bootstrap over clusters, against hand-computed cases and the competition score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinegrade.bootstrap import (
    Interval,
    bootstrap,
    paired_difference,
    percentile_interval,
    resample_counts,
)
from spinegrade.competition import (
    SCORE_PARTS,
    competition_score,
    score_from_sums,
    solution_from_train,
    study_loss_sums,
)
from spinegrade.constants import CONDITIONS, LEVELS, SEVERITIES, train_column


def test_percentile_interval_matches_hand_computed_positions():
    # 41 values 0..40: the 2.5th percentile sits at position 0.025 * 40 = 1, the 97.5th at 39.
    assert percentile_interval(np.arange(41.0)) == pytest.approx((1.0, 39.0), abs=1e-12)
    # 90%: positions 2 and 38; NaN replicates are left out.
    assert percentile_interval(np.r_[np.arange(41.0), np.nan], level=0.90) == pytest.approx(
        (2.0, 38.0), abs=1e-12)
    assert np.isnan(percentile_interval(np.array([np.nan]))[0])


def test_clusters_are_resampled_whole():
    # Cluster A holds two rows of value 0, cluster B one row of value 1. Drawing 2 clusters
    # gives AA (mean 0, p = 1/4), AB or BA (mean 1/3, p = 1/2) and BB (mean 1, p = 1/4);
    # resampling rows instead would also give 2/3.
    values = np.array([0.0, 0.0, 1.0])
    codes = np.array([0, 0, 1])

    def mean(m):
        w = m[codes]
        return float(np.dot(w, values) / w.sum())

    counts = resample_counts(2, n_boot=4000, seed=1)
    reps = np.array([mean(c) for c in counts])
    assert set(np.round(reps, 12)) == {0.0, round(1 / 3, 12), 1.0}
    assert abs(np.mean(np.isclose(reps, 1 / 3)) - 0.5) < 0.03
    assert abs(np.mean(reps == 0.0) - 0.25) < 0.03
    (iv,) = bootstrap(mean, 2, n_boot=4000, seed=1)
    assert iv.estimate == pytest.approx(1 / 3)
    assert (iv.low, iv.high) == (0.0, 1.0)


def test_interval_of_a_mean_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    (iv,) = bootstrap(lambda m: float(np.dot(m, x) / m.sum()), len(x), n_boot=2000)
    # Normal theory: half-width 1.96 * sd / sqrt(n).
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.12)
    assert iv.low < x.mean() < iv.high


def test_paired_difference_of_identical_models_is_exactly_zero_and_a_shift_is_not():
    rng = np.random.default_rng(0)
    study = np.repeat(np.arange(50), 4)
    a = rng.normal(size=200)

    def mean_of(v):
        return lambda w: float(np.dot(w, v) / w.sum())

    same = paired_difference(mean_of(a), mean_of(a.copy()), study)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and same.contains_zero
    shifted = paired_difference(mean_of(a + 1.0), mean_of(a), study)
    assert shifted.low == pytest.approx(1.0) and not shifted.contains_zero
    noisy = paired_difference(mean_of(a + 0.01 + rng.normal(size=200)), mean_of(a), study)
    assert noisy.contains_zero


def test_interval_serialises_nan_as_none():
    d = Interval(0.5, float("nan"), 1.0).to_dict()
    assert d["low"] is None and d["estimate"] == 0.5
    assert Interval(0.5, float("nan"), 1.0).contains_zero


def _train_frame(n_studies: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        row = {"study_id": 100 + s}
        for c in CONDITIONS:
            for lv in LEVELS:
                row[train_column(c, lv)] = rng.choice(SEVERITIES, p=[0.6, 0.25, 0.15])
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.iloc[0, 3] = np.nan  # an empty cell is unscored
    return frame


def _submission(solution: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sub = pd.DataFrame(rng.dirichlet([1, 1, 1], size=len(solution)),
                       columns=["normal_mild", "moderate", "severe"])
    sub.insert(0, "row_id", solution["row_id"].to_numpy())
    return sub


def test_study_sums_reproduce_the_competition_score():
    sol = solution_from_train(_train_frame(12, 0))
    sub = _submission(sol, 1)
    studies, numer, denom = study_loss_sums(sol, sub)
    got = score_from_sums(numer, denom)
    want = competition_score(sol, sub)
    for j, part in enumerate(SCORE_PARTS):
        assert got[j] == pytest.approx(want[part], abs=1e-12)
    assert got[-1] == pytest.approx(want["score"], abs=1e-12)
    assert list(studies) == sorted(str(100 + s) for s in range(12))


def test_a_study_drawn_twice_scores_as_its_copy_under_a_new_id():
    train = _train_frame(6, 2)
    sol = solution_from_train(train)
    sub = _submission(sol, 3)
    studies, numer, denom = study_loss_sums(sol, sub)
    m = np.ones(len(studies))
    m[studies.tolist().index("102")] = 2
    m[studies.tolist().index("104")] = 0
    # The same replicate as frames: study 102 copied as study 999, study 104 dropped.
    copy_train = pd.concat([train, train[train["study_id"] == 102].assign(study_id=999)])
    copy_train = copy_train[copy_train["study_id"] != 104]
    copy_sol = solution_from_train(copy_train)
    copy_sub = pd.concat([sub, sub[sub["row_id"].str.startswith("102_")].assign(
        row_id=lambda f: f["row_id"].str.replace("102_", "999_", n=1))])
    want = competition_score(copy_sol, copy_sub)
    got = score_from_sums(numer, denom, m)
    assert got[-1] == pytest.approx(want["score"], abs=1e-12)
    assert got[3] == pytest.approx(want["any_severe_spinal"], abs=1e-12)
