"""The exact RSNA 2024 Lumbar Spine competition score, its solution and submission frames.

Pure numpy/pandas: no torch, and no scikit-learn at runtime, so the score does not change
with the installed scikit-learn (newer versions reject the unnormalised rows that the
competition's ``sklearn.metrics.log_loss`` silently renormalised).

Competition metric, as run on Kaggle in 2024:

* For each condition group (``constants.CONDITION_GROUPS``) a log loss weighted per row by
  the solution's ``sample_weight`` (1/2/4 by true severity); probabilities are clipped to
  ``[eps, 1 - eps]`` with ``eps`` the float64 machine epsilon, then each row is renormalised.
* ``any_severe_spinal``: one binary row per study. Label: any spinal level Severe.
  Prediction: the largest submitted ``severe`` probability among the study's spinal rows,
  taken before any renormalisation. Weight: the study's largest spinal sample weight. As
  sklearn did for a 1-column prediction, the pair ``[1 - p, p]`` is clipped and renormalised.
* The score is the unweighted mean of the four losses.

Besides the score: solutions from ``train.csv`` (``solution_from_train``), baseline
submissions, and the class prior (``class_prior``) that the prior baseline and the
predictor's fallback share.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from spinegrade.constants import (
    ANY_SEVERE_SPINAL,
    CLASS_NAMES,
    CLASS_WEIGHTS,
    CONDITION_GROUPS,
    CONDITIONS,
    LEVELS,
    NUM_CLASSES,
    PRIOR_FLOOR,
    PRIOR_PSEUDO_COUNT,
    SEVERITY_TO_INDEX,
    SOLUTION_WEIGHT_COLUMN,
    SUBMISSION_COLUMNS,
    row_id,
    train_column,
)
from spinegrade.errors import UserError
from spinegrade.metrics import clip_renormalise, sample_weights, weighted_mean

log = logging.getLogger(__name__)

ROW_ID = SUBMISSION_COLUMNS[0]
PROB_COLUMNS: tuple[str, ...] = SUBMISSION_COLUMNS[1:]
# The four parts of the score, in report order.
SCORE_PARTS: tuple[str, ...] = (*CONDITION_GROUPS, ANY_SEVERE_SPINAL)
SPINAL_GROUP = next(g for g, conds in CONDITION_GROUPS.items() if CONDITIONS[0] in conds)
_CONDITION_TO_GROUP = {c: g for g, conds in CONDITION_GROUPS.items() for c in conds}
# Longest alternatives first so a condition name never stops at a shorter prefix.
_ROW_ID_RE = re.compile(
    r"^(?P<study_id>.+?)_(?P<condition>{})_(?P<level>{})$".format(
        "|".join(map(re.escape, sorted(CONDITIONS, key=len, reverse=True))),
        "|".join(map(re.escape, LEVELS)),
    )
)
_N_NAMED = 5  # how many offending rows an error message names


# --- Competition score ------------------------------------------------------------------------


def _name_some(items: Iterable[object]) -> str:
    items = list(items)
    shown = ", ".join(map(str, items[:_N_NAMED]))
    return shown + (f" (and {len(items) - _N_NAMED} more)" if len(items) > _N_NAMED else "")


def parse_row_ids(row_ids: pd.Series | Sequence[str]) -> pd.DataFrame:
    """Split ``{study_id}_{condition}_{level}`` row ids (condition names hold underscores).

    Args:
        row_ids: submission row ids.

    Returns:
        Frame with ``study_id`` (str), ``condition``, ``level`` and ``group`` (the
        ``CONDITION_GROUPS`` key), indexed like ``row_ids``.

    Raises:
        UserError: naming row ids that do not parse.
    """
    ids = pd.Series(row_ids, dtype=object).astype(str)
    parts = ids.str.extract(_ROW_ID_RE)
    bad = ids[parts["condition"].isna()]
    if len(bad):
        raise UserError(
            f"{len(bad)} row_id(s) are not '{{study_id}}_{{condition}}_{{level}}' with a known "
            f"condition and level: {_name_some(bad)}"
        )
    parts["group"] = parts["condition"].map(_CONDITION_TO_GROUP)
    return parts


def _require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}")


def _check_unique(ids: pd.Series, what: str) -> None:
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise UserError(f"{what} has {len(dup)} duplicated row_id(s): {_name_some(dup)}")


def _check_solution(solution: pd.DataFrame) -> pd.DataFrame:
    """Validated solution with float labels/weights; unscored rows get weight 0."""
    _require_columns(solution, (ROW_ID, *PROB_COLUMNS, SOLUTION_WEIGHT_COLUMN), "solution")
    sol = solution[[ROW_ID, *PROB_COLUMNS, SOLUTION_WEIGHT_COLUMN]].reset_index(drop=True)
    sol[ROW_ID] = sol[ROW_ID].astype(str)
    _check_unique(sol[ROW_ID], "solution")
    for c in (*PROB_COLUMNS, SOLUTION_WEIGHT_COLUMN):
        sol[c] = pd.to_numeric(sol[c], errors="coerce")
    # An empty label (NaN weight or NaN one-hot) is an unscored row, like weight 0.
    onehot = sol[list(PROB_COLUMNS)].to_numpy()
    unscored = sol[SOLUTION_WEIGHT_COLUMN].isna() | np.isnan(onehot).any(axis=1)
    sol.loc[unscored, SOLUTION_WEIGHT_COLUMN] = 0.0
    sol[list(PROB_COLUMNS)] = np.nan_to_num(onehot)
    scored = sol[SOLUTION_WEIGHT_COLUMN].to_numpy() > 0
    onehot = sol[list(PROB_COLUMNS)].to_numpy()
    valid = np.isin(onehot, (0.0, 1.0)).all(axis=1) & (onehot.sum(axis=1) == 1)
    bad = sol.loc[(scored & ~valid) | (sol[SOLUTION_WEIGHT_COLUMN] < 0).to_numpy(), ROW_ID]
    if len(bad):
        raise UserError(
            f"solution rows need one-hot {list(PROB_COLUMNS)} and a sample_weight >= 0; "
            f"{len(bad)} row(s) do not: {_name_some(bad)}"
        )
    return sol.join(parse_row_ids(sol[ROW_ID]))


def _check_submission(submission: pd.DataFrame) -> pd.DataFrame:
    """Validated submission: unique row ids, finite non-negative numeric probabilities."""
    _require_columns(submission, SUBMISSION_COLUMNS, "submission")
    sub = submission[list(SUBMISSION_COLUMNS)].reset_index(drop=True)
    sub[ROW_ID] = sub[ROW_ID].astype(str)
    _check_unique(sub[ROW_ID], "submission")
    for c in PROB_COLUMNS:
        raw = sub[c]
        sub[c] = pd.to_numeric(raw, errors="coerce")
        text = sub.loc[sub[c].isna() & raw.notna(), ROW_ID]
        if len(text):
            raise UserError(f"submission column '{c}' holds non-numeric values in row(s) "
                            f"{_name_some(text)}")
    values = sub[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    for problem, mask in (("missing (NaN)", np.isnan(values)),
                          ("infinite", np.isinf(values)),
                          ("negative", values < 0)):
        rows = mask.any(axis=1)
        if rows.any():
            cols = [c for c, hit in zip(PROB_COLUMNS, mask.any(axis=0), strict=True) if hit]
            raise UserError(f"submission has {problem} probabilities in column(s) {cols}, "
                            f"row(s) {_name_some(sub.loc[rows, ROW_ID])}")
    return sub


def check_normalised(submission: pd.DataFrame) -> None:
    """Reject rows that cannot be probability distributions: all zero, or a value above 1.

    The competition renormalised every row (so such rows scored, as ``competition_score``
    still does); a submission holding them is usually a bug (logits, percentages, a
    zero-filled template), so ``spinegrade score`` refuses them unless told otherwise.

    Raises:
        UserError: naming the rows and ``--allow-unnormalised``.
    """
    sub = _check_submission(submission)
    values = sub[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    allow = ("; if the rows are meant to be renormalised (as the competition did), pass "
             "--allow-unnormalised")
    zero = (values == 0).all(axis=1)
    if zero.any():
        raise UserError(f"submission has {int(zero.sum())} all-zero row(s): "
                        f"{_name_some(sub.loc[zero, ROW_ID])}{allow}")
    above = (values > 1.0).any(axis=1)
    if above.any():
        raise UserError(f"submission has {int(above.sum())} row(s) with a probability above 1: "
                        f"{_name_some(sub.loc[above, ROW_ID])}{allow}")


def _align(sol: pd.DataFrame, sub: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Submission probabilities in solution row order, and how many submission rows were unused."""
    indexed = sub.set_index(ROW_ID)[list(PROB_COLUMNS)]
    missing = sol.loc[~sol[ROW_ID].isin(indexed.index), ROW_ID]
    if len(missing):
        raise UserError(f"submission lacks {len(missing)} of the solution's {len(sol)} rows: "
                        f"{_name_some(missing)}")
    extra = sub.loc[~sub[ROW_ID].isin(sol[ROW_ID]), ROW_ID]
    # Rows of a scored study whose label is empty are expected (every study has 25 rows);
    # rows of studies the solution does not know suggest the wrong solution or fold.
    foreign = extra[~extra.str.extract(_ROW_ID_RE)["study_id"].isin(set(sol["study_id"]))]
    if len(foreign):
        log.warning("ignoring %d submission row(s) of studies not in the solution: %s",
                    len(foreign), _name_some(foreign))
    return indexed.loc[sol[ROW_ID]].to_numpy(dtype=np.float64), len(extra)


def _group_loss(onehot: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    """sklearn-2024 log_loss: clip, renormalise, weighted mean of ``-sum_k y_k log p_k``."""
    loss = -(onehot * np.log(clip_renormalise(probs))).sum(axis=1)
    return weighted_mean(loss, weights)


def _any_severe_frame(sol: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """Per study with spinal rows: ``label``, ``weight``, ``pred`` and its ``loss``."""
    spinal = sol["group"].to_numpy() == SPINAL_GROUP
    severe = PROB_COLUMNS.index(CLASS_NAMES[-1])
    per_study = pd.DataFrame({
        "study_id": sol.loc[spinal, "study_id"].to_numpy(),
        "label": sol.loc[spinal, PROB_COLUMNS[severe]].to_numpy(),
        "weight": sol.loc[spinal, SOLUTION_WEIGHT_COLUMN].to_numpy(),
        "pred": probs[spinal, severe],  # raw: the max is taken before any renormalisation
    }).groupby("study_id", sort=False).max()
    p, y = per_study["pred"].to_numpy(), per_study["label"].to_numpy()
    # sklearn expanded a 1-column prediction to [1 - p, p] before clipping and renormalising.
    per_study["loss"] = -(np.column_stack([1.0 - y, y])
                          * np.log(clip_renormalise(np.column_stack([1.0 - p, p])))).sum(axis=1)
    return per_study


def _any_severe_spinal(sol: pd.DataFrame, probs: np.ndarray) -> tuple[float, int]:
    """Loss and number of scored studies of the per-study any-severe-spinal term."""
    per_study = _any_severe_frame(sol, probs)
    w = per_study["weight"].to_numpy()
    return weighted_mean(per_study["loss"].to_numpy(), w), int((w > 0).sum())


def competition_score(solution: pd.DataFrame, submission: pd.DataFrame) -> dict:
    """The RSNA 2024 Lumbar Spine competition score (lower is better).

    Args:
        solution: ``row_id``, one-hot ``normal_mild``/``moderate``/``severe`` and
            ``sample_weight``. Rows with empty labels are either absent or carry weight 0
            (or NaN): both are unscored. A weight-0 spinal row still takes part in its
            study's any-severe maximum, as in the competition code, where the submission
            was aligned to every solution row.
        submission: ``row_id`` and the three probability columns; rows need not sum to one.
            It must cover every solution row. Other rows are ignored (the competition
            demanded exactly the sample rows, but a full 25-rows-per-study submission
            against a solution without empty cells is normal); rows of studies absent
            from the solution are logged as a warning.

    Returns:
        ``spinal``, ``foraminal``, ``subarticular``, ``any_severe_spinal`` and ``score``
        (floats); ``n_scored`` ({part: rows, or studies for any_severe_spinal, with weight
        > 0}); ``n_ignored_rows`` (submission rows not in the solution). A part with nothing
        to score is NaN and the score is the mean of the other parts (with a warning).

    Raises:
        UserError: on missing columns, duplicated or unparseable row ids, submission rows
            missing, non-numeric, NaN, infinite or negative values, or a bad solution.
    """
    sol = _check_solution(solution)
    probs, n_ignored = _align(sol, _check_submission(submission))
    onehot = sol[list(PROB_COLUMNS)].to_numpy()
    weights = sol[SOLUTION_WEIGHT_COLUMN].to_numpy()
    result: dict = {}
    n_scored: dict[str, int] = {}
    for group in CONDITION_GROUPS:
        rows = sol["group"].to_numpy() == group
        result[group] = _group_loss(onehot[rows], probs[rows], weights[rows])
        n_scored[group] = int((weights[rows] > 0).sum())
    result[ANY_SEVERE_SPINAL], n_scored[ANY_SEVERE_SPINAL] = _any_severe_spinal(sol, probs)
    parts = np.array([result[p] for p in SCORE_PARTS])
    if np.isnan(parts).all():
        raise UserError("the solution has no scored rows (every sample_weight is 0 or empty)")
    if np.isnan(parts).any():
        log.warning("nothing to score for %s: the score averages the other parts only",
                    [p for p, v in zip(SCORE_PARTS, parts, strict=True) if np.isnan(v)])
    result["score"] = float(np.nanmean(parts))
    result["n_scored"] = n_scored
    result["n_ignored_rows"] = n_ignored
    return result


def study_loss_sums(solution: pd.DataFrame, submission: pd.DataFrame
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each study's share of each score part, for a bootstrap over studies.

    Part ``j``'s loss is ``numer[:, j].sum() / denom[:, j].sum()``; with the studies drawn
    ``m`` times each (a bootstrap replicate) it is ``m @ numer[:, j] / m @ denom[:, j]``, and
    :func:`score_from_sums` turns that into the four parts and the score. With ``m`` all ones
    this is :func:`competition_score` exactly.

    Returns:
        ``study_ids`` (S,) as text, ``numer`` and ``denom`` (S, 4) in ``SCORE_PARTS`` order:
        the summed weighted loss and the summed weight of the study's rows in that part.
    """
    sol = _check_solution(solution)
    probs, _ = _align(sol, _check_submission(submission))
    studies, code = np.unique(sol["study_id"].to_numpy(dtype=str), return_inverse=True)
    numer = np.zeros((len(studies), len(SCORE_PARTS)))
    denom = np.zeros_like(numer)
    onehot = sol[list(PROB_COLUMNS)].to_numpy()
    weights = sol[SOLUTION_WEIGHT_COLUMN].to_numpy()
    row_loss = -(onehot * np.log(clip_renormalise(probs))).sum(axis=1)
    for j, group in enumerate(CONDITION_GROUPS):
        rows = sol["group"].to_numpy() == group
        numer[:, j] = np.bincount(code[rows], weights=weights[rows] * row_loss[rows],
                                  minlength=len(studies))
        denom[:, j] = np.bincount(code[rows], weights=weights[rows], minlength=len(studies))
    per_study = _any_severe_frame(sol, probs)
    at = np.searchsorted(studies, per_study.index.to_numpy(dtype=str))
    numer[at, -1] = per_study["weight"].to_numpy() * per_study["loss"].to_numpy()
    denom[at, -1] = per_study["weight"].to_numpy()
    return studies, numer, denom


def score_from_sums(numer: np.ndarray, denom: np.ndarray,
                    multiplicity: np.ndarray | None = None) -> np.ndarray:
    """The four parts and the score (5,) from :func:`study_loss_sums`, studies counted
    ``multiplicity`` times (default once); a part without weight is NaN, as in the score."""
    m = np.ones(len(numer)) if multiplicity is None else np.asarray(multiplicity, float)
    num, den = m @ numer, m @ denom
    parts = np.full(len(SCORE_PARTS), np.nan)
    np.divide(num, den, out=parts, where=den > 0)
    total = float(np.nanmean(parts)) if not np.isnan(parts).all() else float("nan")
    return np.append(parts, total)


# --- Solutions and baseline submissions -------------------------------------------------------


def _train_labels(train: pd.DataFrame) -> pd.DataFrame:
    """Long frame ``study_id, condition, level, label`` of a train.csv frame, empty cells dropped."""
    columns = {train_column(c, lv): (c, lv) for c in CONDITIONS for lv in LEVELS}
    _require_columns(train, ("study_id", *columns), "train frame")
    frame = train.dropna(how="all")  # published copies carry blank trailing rows
    if frame["study_id"].isna().any():
        raise UserError(f"train frame has {int(frame['study_id'].isna().sum())} labelled "
                        "row(s) without a study_id")
    ids = frame["study_id"]
    numeric = pd.to_numeric(ids, errors="coerce")
    # Blank rows turn the column into floats; write ids back as integers when they are.
    if numeric.notna().all() and (numeric % 1 == 0).all():
        ids = numeric.astype(np.int64)
    frame = frame.assign(study_id=ids.astype(str))
    _check_unique(frame["study_id"], "train frame (study_id)")
    long = frame.melt(id_vars="study_id", value_vars=list(columns),
                      var_name="column", value_name="severity")
    long = long[long["severity"].notna()]
    long = long.assign(severity=long["severity"].astype(str).str.strip())
    long = long[long["severity"] != ""]
    long = long.assign(label=long["severity"].map(SEVERITY_TO_INDEX))
    unknown = long[long["label"].isna()]
    if len(unknown):
        raise UserError(f"train frame has unknown severities {_name_some(unknown['severity'].unique())} "
                        f"(expected {list(SEVERITY_TO_INDEX)}), e.g. study "
                        f"{unknown['study_id'].iloc[0]} column {unknown['column'].iloc[0]}")
    study_order = {s: i for i, s in enumerate(frame["study_id"])}
    column_order = {c: i for i, c in enumerate(columns)}
    long = long.assign(_s=long["study_id"].map(study_order), _c=long["column"].map(column_order))
    long = long.sort_values(["_s", "_c"], kind="stable")
    cond_level = long["column"].map(columns)
    return pd.DataFrame({
        "study_id": long["study_id"].to_numpy(),
        "condition": [cl[0] for cl in cond_level],
        "level": [cl[1] for cl in cond_level],
        "label": long["label"].to_numpy(dtype=np.int64),
    })


def solution_from_train(train: pd.DataFrame) -> pd.DataFrame:
    """The competition solution for the studies of a train.csv frame.

    Args:
        train: ``study_id`` plus the 25 ``{condition}_{level}`` columns holding
            ``Normal/Mild``/``Moderate``/``Severe`` or empty. Blank rows are tolerated.

    Returns:
        ``row_id``, one-hot ``normal_mild``/``moderate``/``severe`` and ``sample_weight``
        (``CLASS_WEIGHTS`` by true severity), one row per labelled cell; empty cells are
        left out (unscored), ordered by study then condition and level.

    Raises:
        UserError: on missing columns, duplicated study ids or unknown severities.
    """
    labels = _train_labels(train)
    ids = [row_id(s, c, lv) for s, c, lv in
           zip(labels["study_id"], labels["condition"], labels["level"], strict=True)]
    return _solution_frame(ids, labels["label"].to_numpy())


def _solution_frame(ids: Sequence[str], y: np.ndarray) -> pd.DataFrame:
    """Solution rows: row id, one-hot truth and the competition sample weight."""
    out = pd.DataFrame(np.eye(NUM_CLASSES)[y], columns=list(PROB_COLUMNS))
    out.insert(0, ROW_ID, list(ids))
    out[SOLUTION_WEIGHT_COLUMN] = sample_weights(y)
    return out


def condition_score(study_ids: Sequence[int], levels: Sequence[str], labels: Sequence[int],
                    probs: np.ndarray, condition: str | Sequence[str]) -> dict:
    """The competition score restricted to some conditions' predictions (e.g. out-of-fold).

    Builds the solution and submission frames of these samples only, so the parts of the
    groups without samples are NaN and ``score`` averages the parts present (for spinal canal
    stenosis: the spinal loss and the any-severe-spinal loss); a group's samples of several
    conditions (left and right foramina) are pooled as the competition pools them.

    Args:
        study_ids, levels, labels: one entry per sample (``levels`` as ``l1_l2`` ...).
        probs: ``(N, 3)`` predicted probabilities.
        condition: a name from ``CONDITIONS``, or one per sample.
    """
    y = np.asarray(labels, dtype=int)
    conditions = [condition] * len(y) if isinstance(condition, str) else list(condition)
    ids = [row_id(s, c, lv) for s, c, lv in zip(study_ids, conditions, levels, strict=True)]
    solution = _solution_frame(ids, y)
    submission = pd.DataFrame(np.asarray(probs, dtype=float), columns=list(PROB_COLUMNS))
    submission.insert(0, ROW_ID, ids)
    # The other groups are absent by design: silence the "nothing to score" warning.
    previous = log.level
    log.setLevel(logging.ERROR)
    try:
        return competition_score(solution, submission)
    finally:
        log.setLevel(previous)


def submission_row_ids(study_ids: Iterable[int | str]) -> list[str]:
    """The 25 row ids of each study, in study, condition, level order."""
    return [row_id(s, c, lv) for s in study_ids for c in CONDITIONS for lv in LEVELS]


def uniform_submission(study_ids: Iterable[int | str]) -> pd.DataFrame:
    """A submission giving 1/3 to every class of every row of ``study_ids``."""
    ids = submission_row_ids(study_ids)
    out = pd.DataFrame(np.full((len(ids), NUM_CLASSES), 1.0 / NUM_CLASSES),
                       columns=list(PROB_COLUMNS))
    out.insert(0, ROW_ID, ids)
    return out


def class_prior(counts: np.ndarray, *, reweight: bool, pseudo_count: float = 0.0,
                floor: float = 0.0) -> np.ndarray:
    """Class frequencies from counts ``(..., K)``, optionally reweighted, each row normalised.

    Args:
        counts: class counts (or frequencies) along the last axis.
        reweight: multiply by ``CLASS_WEIGHTS`` before normalising: the constant that
            minimises the competition's weighted log loss, which is also what a classifier
            trained with class weights [1, 2, 4] outputs when it knows nothing of the image.
        pseudo_count: added to every count first (1 = add-one / Dirichlet(1) smoothing:
            a class unseen in training keeps a probability of the order 1/n).
        floor: last, each row is mixed with the uniform distribution so that no class is
            below ``floor``: ``floor + (1 - K * floor) * p`` (``constants.PRIOR_FLOOR``).

    Returns:
        Float64 probabilities shaped like ``counts``; a row without counts is uniform
        (before reweighting).
    """
    p = np.asarray(counts, dtype=np.float64) + pseudo_count
    p = np.where(p.sum(axis=-1, keepdims=True) > 0, p, 1.0)
    if reweight:
        p = p * np.asarray(CLASS_WEIGHTS)
    p = p / p.sum(axis=-1, keepdims=True)
    if floor > 0:
        k = p.shape[-1]
        if floor * k >= 1:
            raise ValueError(f"floor {floor} leaves nothing for {k} classes")
        p = floor + (1.0 - k * floor) * p
    return p


def prior_submission(train: pd.DataFrame, study_ids: Iterable[int | str] | None = None, *,
                     reweight: bool = False, smooth: bool = False) -> pd.DataFrame:
    """A submission predicting each train column's class frequencies for every study.

    Args:
        train: train.csv frame the per-column (condition, level) priors are counted on.
        study_ids: studies to predict; default the train frame's studies.
        reweight: multiply the priors by ``CLASS_WEIGHTS`` and renormalise, the loss-optimal
            constant under the competition's weighting.
        smooth: add-one counts and ``PRIOR_FLOOR``, as predict's fallback priors: no exact
            zero (one costs ~34 nats times its weight), the honest baseline to compare with.

    Returns:
        Submission frame (``row_id`` + probabilities), 25 rows per study. A column with no
        labels gets the uniform distribution.
    """
    labels = _train_labels(train)
    counts = (pd.crosstab([labels["condition"], labels["level"]], labels["label"])
              .reindex(columns=range(NUM_CLASSES), fill_value=0))
    index = pd.MultiIndex.from_product([CONDITIONS, LEVELS])
    prior = class_prior(counts.reindex(index, fill_value=0).to_numpy(dtype=np.float64),
                        reweight=reweight, pseudo_count=PRIOR_PSEUDO_COUNT if smooth else 0.0,
                        floor=PRIOR_FLOOR if smooth else 0.0)
    if study_ids is None:
        study_ids = labels["study_id"].unique()
    study_ids = list(study_ids)
    out = pd.DataFrame(np.tile(prior, (len(study_ids), 1)), columns=list(PROB_COLUMNS))
    out.insert(0, ROW_ID, submission_row_ids(study_ids))
    return out
