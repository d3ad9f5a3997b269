"""The competition score against an independent row-by-row loop and sklearn; solutions and
baselines from train.csv against the published reference points."""

from __future__ import annotations

import logging
import math
import sys
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics as skm

from spinegrade import competition
from spinegrade.constants import (
    ANY_SEVERE_SPINAL,
    CLASS_BALANCE,
    CLASS_WEIGHTS,
    CONDITION_GROUPS,
    CONDITIONS,
    LEVELS,
    SEVERITIES,
    SOLUTION_WEIGHT_COLUMN,
    SPINAL_LEVEL_COUNTS,
    SUBMISSION_COLUMNS,
    TRAIN_COLUMNS,
    row_id,
    train_column,
)
from spinegrade.errors import UserError

PROBS = list(SUBMISSION_COLUMNS[1:])
SPINAL = CONDITIONS[0]

# --- Competition score: an independent reference ----------------------------------------------


def reference_score(solution: pd.DataFrame, submission: pd.DataFrame) -> dict[str, float]:
    """The competition metric as a plain loop over rows with math.log and dictionaries."""
    eps = sys.float_info.epsilon
    predicted = {r[0]: list(r[1:]) for r in submission[list(SUBMISSION_COLUMNS)].itertuples(index=False)}
    group_of = {c: g for g, conds in CONDITION_GROUPS.items() for c in conds}
    numerator, denominator = defaultdict(float), defaultdict(float)
    study_label, study_weight, study_pred = {}, {}, {}
    for rid, nm, mo, se, weight in solution[[*SUBMISSION_COLUMNS, SOLUTION_WEIGHT_COLUMN]].itertuples(index=False):
        condition = max((c for c in CONDITIONS if f"_{c}_" in rid), key=len)
        group = group_of[condition]
        probs = predicted[rid]
        clipped = [min(max(v, eps), 1 - eps) for v in probs]
        if weight > 0:
            k = [nm, mo, se].index(1)
            numerator[group] += weight * -math.log(clipped[k] / sum(clipped))
            denominator[group] += weight
        if condition == SPINAL:
            study = rid[: rid.index("_" + condition)]
            study_label[study] = max(study_label.get(study, 0), se)
            study_weight[study] = max(study_weight.get(study, 0), weight)
            study_pred[study] = max(study_pred.get(study, -math.inf), probs[2])
    out = {g: numerator[g] / denominator[g] for g in CONDITION_GROUPS}
    num = den = 0.0
    for study, p in study_pred.items():
        pair = [min(max(1 - p, eps), 1 - eps), min(max(p, eps), 1 - eps)]
        num += study_weight[study] * -math.log(pair[int(study_label[study])] / sum(pair))
        den += study_weight[study]
    out[ANY_SEVERE_SPINAL] = num / den
    out["score"] = sum(out.values()) / 4
    return out


def sklearn_score(solution: pd.DataFrame, submission: pd.DataFrame) -> float:
    """The metric through sklearn's log_loss, fed probabilities already clipped and renormalised."""
    eps = np.finfo(np.float64).eps

    def renorm(p):
        p = np.clip(p, eps, 1 - eps)
        return p / p.sum(axis=1, keepdims=True)

    merged = solution.merge(submission, on=SUBMISSION_COLUMNS[0], suffixes=("", "_pred"))
    merged["condition"] = [max((c for c in CONDITIONS if f"_{c}_" in r), key=len)
                           for r in merged[SUBMISSION_COLUMNS[0]]]
    losses = []
    for conds in CONDITION_GROUPS.values():
        g = merged[merged["condition"].isin(conds) & (merged[SOLUTION_WEIGHT_COLUMN] > 0)]
        losses.append(skm.log_loss(g[PROBS].to_numpy().argmax(1),
                                   renorm(g[[f"{c}_pred" for c in PROBS]].to_numpy()),
                                   sample_weight=g[SOLUTION_WEIGHT_COLUMN], labels=[0, 1, 2]))
    spinal = merged[merged["condition"] == SPINAL].copy()
    spinal["study"] = [r.split("_")[0] for r in spinal[SUBMISSION_COLUMNS[0]]]
    s = spinal.groupby("study").agg(y=(PROBS[2], "max"), w=(SOLUTION_WEIGHT_COLUMN, "max"),
                                    p=(f"{PROBS[2]}_pred", "max"))
    pairs = renorm(np.column_stack([1 - s["p"], s["p"]]))
    losses.append(skm.log_loss(s["y"].astype(int), pairs, sample_weight=s["w"], labels=[0, 1]))
    return float(np.mean(losses))


def random_solution(rng, n_studies=40, empty="absent", empty_rate=0.05) -> pd.DataFrame:
    """A solution with random labels; empty cells are left out or carry weight 0."""
    rows = []
    for study in rng.choice(10**8, n_studies, replace=False):
        for c in CONDITIONS:
            for lv in LEVELS:
                y = rng.choice(3, p=np.asarray(CLASS_BALANCE[c]) / np.sum(CLASS_BALANCE[c]))
                onehot, weight = list(np.eye(3)[y]), CLASS_WEIGHTS[y]
                if rng.random() < empty_rate:
                    if empty == "absent":
                        continue
                    onehot, weight = [0.0, 0.0, 0.0], 0.0
                rows.append([row_id(study, c, lv), *onehot, weight])
    return pd.DataFrame(rows, columns=[*SUBMISSION_COLUMNS, SOLUTION_WEIGHT_COLUMN])


def submission_for(solution, values) -> pd.DataFrame:
    sub = pd.DataFrame(values, columns=PROBS)
    sub.insert(0, SUBMISSION_COLUMNS[0], solution[SUBMISSION_COLUMNS[0]].to_numpy())
    return sub


@pytest.mark.parametrize("kind", ["random", "unnormalised", "hard"])
@pytest.mark.parametrize("empty", ["absent", "zero"])
def test_competition_score_matches_independent_loop(kind, empty):
    rng = np.random.default_rng(len(kind) * 10 + len(empty))
    sol = random_solution(rng, empty=empty)
    n = len(sol)
    if kind == "random":
        values = rng.dirichlet([1, 1, 1], n)
    elif kind == "unnormalised":
        values = rng.dirichlet([1, 1, 1], n) * rng.uniform(0.01, 5, (n, 1))
        values[rng.random((n, 3)) < 0.1] = 0.0
        values[rng.random(n) < 0.05, 2] = 3.0  # a severe "probability" above 1
    else:
        values = np.eye(3)[rng.integers(0, 3, n)]
    sub = submission_for(sol, values)
    # Row order and the frames' index do not matter.
    got = competition.competition_score(sol.set_axis(np.zeros(n, dtype=int)),
                                    sub.sample(frac=1, random_state=0))
    want = reference_score(sol, sub)
    for part in (*competition.SCORE_PARTS, "score"):
        assert got[part] == pytest.approx(want[part], abs=1e-9), part
    if kind != "unnormalised":
        # Renormalising can push a clipped eps below eps; sklearn >= 1.5 clips it again, so
        # the two agree only on rows that needed no renormalising beyond rounding.
        assert got["score"] == pytest.approx(sklearn_score(sol, sub), abs=1e-9)
    scored = sol[SOLUTION_WEIGHT_COLUMN] > 0
    assert sum(got["n_scored"][g] for g in CONDITION_GROUPS) == scored.sum()
    assert got["n_scored"][ANY_SEVERE_SPINAL] == 40


def test_absent_and_zero_weight_empty_cells_score_alike():
    rng = np.random.default_rng(7)
    sol = random_solution(rng, empty="zero", empty_rate=0.1)
    # Keep empty spinal cells scored so both representations have the same any-severe rows.
    spinal = sol[SUBMISSION_COLUMNS[0]].str.contains(SPINAL)
    sol = sol[~spinal | (sol[SOLUTION_WEIGHT_COLUMN] > 0)]
    sub = submission_for(sol, rng.dirichlet([1, 1, 1], len(sol)))
    with_zero = competition.competition_score(sol, sub)
    absent = competition.competition_score(sol[sol[SOLUTION_WEIGHT_COLUMN] > 0], sub)
    for part in (*competition.SCORE_PARTS, "score"):
        assert with_zero[part] == pytest.approx(absent[part], abs=1e-12)
    assert absent["n_ignored_rows"] == (sol[SOLUTION_WEIGHT_COLUMN] == 0).sum()


def test_any_severe_uses_raw_severe_before_renormalising():
    sol = random_solution(np.random.default_rng(1), n_studies=3, empty_rate=0.0)
    sub = submission_for(sol, np.tile([1.0, 1.0, 0.5], (len(sol), 1)))
    # Renormalised the severe probability would be 0.2; the metric takes the raw 0.5.
    y = sol[sol[SUBMISSION_COLUMNS[0]].str.contains(SPINAL)].groupby(
        sol[SUBMISSION_COLUMNS[0]].str.split("_").str[0])
    label, weight = y[PROBS[2]].max(), y[SOLUTION_WEIGHT_COLUMN].max()
    expected = float(np.sum(weight * -np.log(0.5)) / weight.sum())
    assert label.notna().all()
    assert competition.competition_score(sol, sub)[ANY_SEVERE_SPINAL] == pytest.approx(expected)


def test_parse_row_ids_copes_with_underscores():
    ids = [row_id(44036939, c, lv) for c in CONDITIONS for lv in LEVELS] + ["a_b_spinal_canal_stenosis_l5_s1"]
    parsed = competition.parse_row_ids(ids)
    assert list(parsed["condition"][:25]) == [c for c in CONDITIONS for _ in LEVELS]
    assert list(parsed["level"][:25]) == list(LEVELS) * len(CONDITIONS)
    assert set(parsed["study_id"][:25]) == {"44036939"}
    assert parsed["study_id"].iloc[-1] == "a_b"
    with pytest.raises(UserError, match="1_spinal_canal_stenosis_l9_l9"):
        competition.parse_row_ids(["1_spinal_canal_stenosis_l9_l9"])


@pytest.fixture
def small():
    sol = random_solution(np.random.default_rng(3), n_studies=4, empty_rate=0.0)
    return sol, submission_for(sol, np.full((len(sol), 3), 1 / 3))


def test_submission_validation_names_the_rows(small):
    sol, sub = small
    first = sub[SUBMISSION_COLUMNS[0]].iloc[0]
    cases = [
        (sub.iloc[1:], f"lacks 1 of .*{first}"),
        (pd.concat([sub, sub.iloc[:1]]), f"duplicated.*{first}"),
        (sub.drop(columns=PROBS[1]), f"lacks column.*{PROBS[1]}"),
    ]
    for column, value, problem in [(PROBS[0], np.nan, "NaN"), (PROBS[2], -0.1, "negative"),
                                   (PROBS[1], np.inf, "infinite"), (PROBS[1], "abc", "non-numeric")]:
        bad = sub.astype({column: object}).copy()
        bad.loc[0, column] = value
        cases.append((bad, f"{problem}.*{first}"))
    for bad, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            competition.competition_score(sol, bad)


def test_extra_rows_are_ignored_with_a_warning_for_unknown_studies(small, caplog):
    sol, sub = small
    extra = competition.uniform_submission([123])
    with caplog.at_level(logging.WARNING, logger="spinegrade.competition"):
        got = competition.competition_score(sol, pd.concat([sub, extra]))
    assert got["score"] == pytest.approx(competition.competition_score(sol, sub)["score"])
    assert got["n_ignored_rows"] == 25
    assert "123_" in caplog.text


def test_bad_solution_is_rejected(small):
    sol, sub = small
    bad = sol.copy()
    bad.loc[0, PROBS] = [1.0, 1.0, 0.0]
    with pytest.raises(UserError, match="one-hot"):
        competition.competition_score(bad, sub)
    with pytest.raises(UserError, match="no scored rows"):
        competition.competition_score(sol.assign(**{SOLUTION_WEIGHT_COLUMN: 0.0}), sub)


def test_partial_solution_averages_available_parts(small, caplog):
    sol, sub = small
    spinal_only = sol[sol[SUBMISSION_COLUMNS[0]].str.contains(SPINAL)]
    with caplog.at_level(logging.WARNING, logger="spinegrade.competition"):
        got = competition.competition_score(spinal_only, sub)
    assert math.isnan(got["foraminal"]) and got["n_scored"]["foraminal"] == 0
    assert got["score"] == pytest.approx((got["spinal"] + got[ANY_SEVERE_SPINAL]) / 2)
    assert "foraminal" in caplog.text


# --- Solutions from train.csv and the published reference points ------------------------------

# Per-level (Normal/Mild, Moderate, Severe) counts of the real train.csv; their totals are the
# FACTS.md class-balance table (checked below). Spinal counts come from constants.
OTHER_LEVEL_COUNTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    CONDITIONS[1]: ((1908, 63, 2), (1791, 171, 11), (1522, 411, 40), (1204, 629, 140), (1247, 520, 206)),
    CONDITIONS[2]: ((1891, 63, 13), (1793, 168, 6), (1512, 414, 41), (1208, 629, 130), (1281, 496, 190)),
    CONDITIONS[3]: ((1690, 93, 28), (1555, 255, 83), (1324, 454, 194), (887, 624, 461), (1408, 409, 147)),
    CONDITIONS[4]: ((1680, 110, 24), (1577, 243, 73), (1322, 454, 197), (891, 622, 460), (1399, 396, 173)),
}
N_STUDIES = 1975
SEVERE_SPINAL_STUDIES = 365  # FACTS.md
# Not in FACTS.md: studies whose worst spinal level is Moderate. 345 reproduces the uniform
# figure 0.9994; the prior figures (0.9307, 0.7897) then follow with no further fitting.
MODERATE_SPINAL_STUDIES = 345


def realistic_train(seed=0) -> pd.DataFrame:
    """A train.csv frame with the real per-column counts, 572 empty cells, and the real number
    of studies with a Severe spinal level (constant submissions depend on nothing else)."""
    rng = np.random.default_rng(seed)
    labels = np.full((N_STUDIES, len(CONDITIONS), len(LEVELS)), -1)
    spinal = np.array([SPINAL_LEVEL_COUNTS[lv] for lv in LEVELS])
    # Severe cells cycle over the first 365 studies, Moderate ones over the next 345: each level
    # holds fewer cells than its block, so no study gets two labels at one level.
    for grade, first, size in ((2, 0, SEVERE_SPINAL_STUDIES),
                               (1, SEVERE_SPINAL_STUDIES, MODERATE_SPINAL_STUDIES)):
        studies = first + np.arange(spinal[:, grade].sum()) % size
        levels = np.repeat(np.arange(len(LEVELS)), spinal[:, grade])
        labels[studies, 0, levels] = grade
    for i in range(len(LEVELS)):  # Normal/Mild fills the free cells but one: the empty cell
        free = np.flatnonzero(labels[:, 0, i] < 0)
        labels[rng.permutation(free)[: spinal[i, 0]], 0, i] = 0
    for ci, c in enumerate(CONDITIONS[1:], start=1):
        for i, counts in enumerate(OTHER_LEVEL_COUNTS[c]):
            cells = rng.permutation(N_STUDIES)[: sum(counts)]
            labels[cells, ci, i] = np.repeat([0, 1, 2], counts)
    values = np.where(labels < 0, None, np.asarray(SEVERITIES, dtype=object)[labels.clip(0)])
    frame = pd.DataFrame(values.reshape(N_STUDIES, -1), columns=list(TRAIN_COLUMNS[1:]))
    frame.insert(0, "study_id", rng.choice(10**9, N_STUDIES, replace=False))
    return frame


def test_realistic_train_has_the_real_balance():
    train = realistic_train()
    for c in CONDITIONS:
        cols = [train_column(c, lv) for lv in LEVELS]
        counts = train[cols].stack().value_counts().reindex(SEVERITIES).to_numpy()
        np.testing.assert_allclose(counts / counts.sum(), CLASS_BALANCE[c], atol=1e-3)
    spinal = train[[train_column(SPINAL, lv) for lv in LEVELS]]
    assert (spinal == SEVERITIES[2]).any(axis=1).sum() == SEVERE_SPINAL_STUDIES
    assert train.iloc[:, 1:].isna().sum().sum() == 572


def test_baselines_reproduce_the_published_reference_points():
    train = realistic_train()
    solution = competition.solution_from_train(train)
    assert len(solution) == 25 * N_STUDIES - 572
    uniform = competition.competition_score(solution, competition.uniform_submission(train["study_id"]))
    prior = competition.competition_score(solution, competition.prior_submission(train))
    reweighted = competition.competition_score(solution, competition.prior_submission(train, reweight=True))
    for group in CONDITION_GROUPS:
        assert uniform[group] == pytest.approx(math.log(3))
    # FACTS.md: 0.9994, 0.9307, 0.7897 on the real labels (4 decimals).
    assert uniform["score"] == pytest.approx(0.9994, abs=1e-4)
    assert prior["score"] == pytest.approx(0.9307, abs=1e-4)
    assert reweighted["score"] == pytest.approx(0.7897, abs=1e-4)


def test_solution_from_train_skips_empty_cells_and_blank_rows():
    train = realistic_train().head(3)
    train.iloc[0, 1] = None
    blank = pd.DataFrame([[None] * len(TRAIN_COLUMNS)], columns=list(TRAIN_COLUMNS))
    train = pd.concat([train, blank], ignore_index=True)  # study_id becomes float
    sol = competition.solution_from_train(train)
    assert len(sol) == train.iloc[:, 1:].notna().sum().sum()
    first = train["study_id"].iloc[0]
    assert sol[SUBMISSION_COLUMNS[0]].iloc[0] == row_id(int(first), SPINAL, LEVELS[1])
    y = sol[PROBS].to_numpy().argmax(1)
    np.testing.assert_array_equal(sol[SOLUTION_WEIGHT_COLUMN], np.asarray(CLASS_WEIGHTS)[y])
    bad = train.copy()
    bad.iloc[1, 2] = "Severe!"
    with pytest.raises(UserError, match="Severe!"):
        competition.solution_from_train(bad)
    with pytest.raises(UserError, match="lacks column"):
        competition.solution_from_train(train.drop(columns=TRAIN_COLUMNS[3]))


def test_prior_submission_is_the_column_frequency():
    train = realistic_train()
    prior = competition.prior_submission(train, study_ids=[1])
    assert list(prior[SUBMISSION_COLUMNS[0]]) == competition.submission_row_ids([1])
    l4_l5 = prior.set_index(SUBMISSION_COLUMNS[0]).loc[row_id(1, SPINAL, LEVELS[3])].to_numpy()
    counts = np.asarray(SPINAL_LEVEL_COUNTS[LEVELS[3]], dtype=float)
    np.testing.assert_allclose(l4_l5, counts / counts.sum())
    re = competition.prior_submission(train, study_ids=[1], reweight=True)
    np.testing.assert_allclose(re[PROBS].sum(axis=1), 1.0)


def test_smoothed_prior_submission_has_no_exact_zero():
    # One study, every level Normal/Mild: counts (1, 0, 0) per column. Add-one -> (2, 1, 1),
    # x [1, 2, 4] -> (2, 2, 4) / 8, then the 1e-3 floor: 1e-3 + 0.997 * p.
    train = realistic_train().head(1)
    train.loc[:, TRAIN_COLUMNS[1:]] = "Normal/Mild"
    raw = competition.prior_submission(train, study_ids=[1], reweight=True)
    assert (raw[PROBS].to_numpy()[:, 1:] == 0).all()  # unsmoothed: exact zeros
    sm = competition.prior_submission(train, study_ids=[1], reweight=True, smooth=True)
    want = 1e-3 + 0.997 * np.array([0.25, 0.25, 0.5])
    np.testing.assert_allclose(sm[PROBS].to_numpy(), np.tile(want, (25, 1)))


def test_condition_score_on_one_condition_matches_hand_computation():
    # Two studies, two spinal levels each; study 1 has a Severe level, study 2 does not.
    studies = [1, 1, 2, 2]
    levels = ["l1_l2", "l2_l3", "l1_l2", "l2_l3"]
    labels = [0, 2, 0, 1]
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    w = np.array([1.0, 4.0, 1.0, 2.0])
    spinal = -(w * np.log([0.8, 0.5, 0.6, 0.6])).sum() / w.sum()
    # any severe: study 1 label 1, p = max(0.1, 0.5), weight 4; study 2 label 0, p = 0.1,
    # weight 2 (its largest spinal sample weight).
    any_severe = -(4 * math.log(0.5) + 2 * math.log(0.9)) / 6
    result = competition.condition_score(studies, levels, labels, probs, "spinal_canal_stenosis")
    assert result["spinal"] == pytest.approx(spinal, abs=1e-12)
    assert result["any_severe_spinal"] == pytest.approx(any_severe, abs=1e-12)
    assert math.isnan(result["foraminal"]) and math.isnan(result["subarticular"])
    assert result["score"] == pytest.approx((spinal + any_severe) / 2, abs=1e-12)


def test_condition_score_pools_the_two_sides_of_a_group():
    # Left and right foramina of one study: the foraminal part is one weighted mean over both
    # sides' samples (weights 1 and 4), not the mean of two per-side losses.
    conds = ["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"]
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    result = competition.condition_score([7, 7], ["l4_l5", "l4_l5"], [0, 2], probs, conds)
    pooled = -(1 * math.log(0.5) + 4 * math.log(0.8)) / 5
    assert result["foraminal"] == pytest.approx(pooled, abs=1e-12)
    assert result["foraminal"] != pytest.approx((-math.log(0.5) - math.log(0.8)) / 2)
    assert math.isnan(result["spinal"]) and math.isnan(result["subarticular"])


def test_class_prior_by_hand():
    counts = np.array([[8.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(competition.class_prior(counts, reweight=False),
                               [[0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    # Reweighted by 1/2/4: 8, 2, 4 over 14; the empty row is uniform before reweighting.
    np.testing.assert_allclose(competition.class_prior(counts, reweight=True),
                               [[8 / 14, 2 / 14, 4 / 14], [1 / 7, 2 / 7, 4 / 7]])
    smoothed = competition.class_prior(np.array([2.0, 0.0, 0.0]), reweight=False, pseudo_count=1.0)
    np.testing.assert_allclose(smoothed, [0.6, 0.2, 0.2])
