"""What ``spinegrade cv`` writes once every unit is finished.

- ``oof.csv``: one out-of-fold prediction per labelled (study, condition, level) of
  ``train.csv``, in the submission format. A row's prediction is the mean over seeds of the
  final model of the fold that held its study out; a labelled row without a crop (no
  coordinates, unreadable series) or of a condition not trained gets the class-weighted
  prior of its (condition, level) counted on every *other* study (still out of fold), as
  ``predict`` falls back to a prior.
- ``cv.json`` / ``cv.md``: the competition score of ``oof.csv`` (the four parts and the
  total, each with a 95% bootstrap interval over studies); per condition the final model's
  balanced accuracy, per-class recall and weighted log loss as mean +- std over folds, and
  the best-epoch BA (picked on the fold it is reported on, so optimistic), labelled apart;
  the calibration fitted on the condition's pooled out-of-fold predictions.
- ``ensemble.yaml`` (see :mod:`spinegrade.engine.ensemble`) and ``report.html``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade import calibration
from spinegrade.bootstrap import N_BOOT, SEED, bootstrap, mean_std
from spinegrade.competition import (
    PROB_COLUMNS,
    ROW_ID,
    SCORE_PARTS,
    competition_score,
    parse_row_ids,
    score_from_sums,
    solution_from_train,
    study_loss_sums,
)
from spinegrade.constants import (
    CLASS_NAMES,
    CLASS_PROB_COLUMNS,
    LEVELS,
    NUM_CLASSES,
    TRAIN_CSV,
    row_id,
)
from spinegrade.engine import run_folder as rf
from spinegrade.engine.calibrate import load_calibration
from spinegrade.engine.cv import CvFolder, Unit
from spinegrade.engine.ensemble import Ensemble, EnsembleRun, equal_weights, write_ensemble
from spinegrade.engine.evaluate import per_level_recall
from spinegrade.engine.priors import prior_probs
from spinegrade.engine.run_folder import RunFolder
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path, atomic_write_text
from spinegrade.metrics import sample_weights, summarize
from spinegrade.report.cv import build_cv_report, cv_markdown

PROBS = list(CLASS_PROB_COLUMNS)
TOTAL = "total"
# Per-fold numbers that get a mean +- std over folds.
FOLD_STATS = ("final_ba", "best_epoch_ba", "weighted_logloss",
              *(f"recall_{c}" for c in CLASS_NAMES))


def read_run_files(units: Sequence[Unit]
                   ) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Each unit's oof.csv and metrics.csv, read once, by ``unit.tag``."""
    oofs = {u.tag: pd.read_csv(RunFolder(u.run_dir).oof) for u in units}
    metrics = {u.tag: pd.read_csv(RunFolder(u.run_dir).metrics) for u in units}
    return oofs, metrics


def unit_predictions(units: Sequence[Unit], oofs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every unit's oof.csv with ``row_id``, ``condition``, ``fold`` and ``seed`` added."""
    frames = []
    for u in units:
        f = oofs[u.tag].copy()
        f.insert(0, ROW_ID, [row_id(s, u.condition, lv) for s, lv in zip(f["study_id"], f["level"],
                                                                          strict=True)])
        frames.append(f.assign(condition=u.condition, fold=u.fold, seed=u.seed))
    return pd.concat(frames, ignore_index=True)


def fold_predictions(unit_preds: pd.DataFrame) -> pd.DataFrame:
    """One row per (condition, fold, row): the probabilities averaged over seeds."""
    keys = ["condition", "fold", ROW_ID]
    g = unit_preds.groupby(keys, sort=False)
    out = g[PROBS].mean().join(g[["study_id", "level", "label"]].first()).reset_index()
    dup = out[ROW_ID].duplicated(keep=False)
    if dup.any():
        raise UserError(f"{int(dup.sum())} rows are predicted by several folds (e.g. "
                        f"{out.loc[dup, ROW_ID].iloc[0]}): the runs do not share one split")
    return out


def leave_one_study_out_prior(meta: pd.DataFrame, labels: np.ndarray, reweight: bool) -> np.ndarray:
    """(n, 3) prior of each row's (condition, level), counted on the other studies' labels."""
    onehot = np.eye(NUM_CLASSES)[labels]
    column = (meta["condition"] + "/" + meta["level"]).to_numpy()
    totals = pd.DataFrame(onehot).groupby(column).transform("sum").to_numpy()
    return prior_probs(totals - onehot, reweight)


def assemble_oof(solution: pd.DataFrame, folds: pd.DataFrame, reweight: bool
                 ) -> tuple[pd.DataFrame, np.ndarray]:
    """The submission-format OOF frame in solution order, and each row's source."""
    meta = parse_row_ids(solution[ROW_ID])
    labels = solution[list(PROB_COLUMNS)].to_numpy().argmax(axis=1)
    probs = leave_one_study_out_prior(meta, labels, reweight)
    source = np.array(["prior"] * len(solution), dtype=object)
    pos = pd.Index(solution[ROW_ID]).get_indexer(folds[ROW_ID])
    if (pos < 0).any():
        raise UserError(f"{int((pos < 0).sum())} predicted rows (e.g. "
                        f"{folds.loc[pos < 0, ROW_ID].iloc[0]}) have no label in train.csv: "
                        "were the caches prepared from another --data?")
    wrong = labels[pos] != folds["label"].to_numpy()
    if wrong.any():
        raise UserError(f"{int(wrong.sum())} rows carry another label in the crop cache than in "
                        f"train.csv (e.g. {folds.loc[wrong, ROW_ID].iloc[0]}); prepare again")
    probs[pos] = folds[PROBS].to_numpy()
    source[pos] = "model"
    oof = pd.DataFrame(probs, columns=list(PROB_COLUMNS))
    oof.insert(0, ROW_ID, solution[ROW_ID].to_numpy())
    return oof, source


def score_intervals(solution: pd.DataFrame, oof: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """The four parts and the total, each the exact score with a bootstrap interval over studies."""
    exact = competition_score(solution, oof)
    studies, numer, denom = study_loss_sums(solution, oof)
    ivs = bootstrap(lambda m: score_from_sums(numer, denom, m), len(studies), n_boot=n_boot,
                    seed=seed)
    out = {}
    for name, iv in zip((*SCORE_PARTS, TOTAL), ivs, strict=True):
        out[name] = {**iv.to_dict(), "estimate": exact["score" if name == TOTAL else name]}
    out["n_studies"] = len(studies)
    out["n_scored"] = exact["n_scored"]
    return out


def _best_epoch_ba(metrics: pd.DataFrame) -> tuple[float, int]:
    best = int(metrics["balanced_accuracy"].astype(float).idxmax())
    return float(metrics.loc[best, "balanced_accuracy"]), int(metrics.loc[best, "epoch"])


def fold_summary(units: Sequence[Unit], preds: pd.DataFrame, metrics: dict[str, pd.DataFrame]
                 ) -> dict:
    """One fold of one condition: the final model's metrics (seeds averaged) and best epochs."""
    y = preds["label"].to_numpy(dtype=np.int64)
    p = preds[PROBS].to_numpy()
    m = summarize(y, p)
    best = [_best_epoch_ba(metrics[u.tag]) for u in units]
    levels = np.array([LEVELS.index(lv) for lv in preds["level"]])
    out = {"fold": units[0].fold, "seeds": [u.seed for u in units], "n": m["n_samples"],
           "final_checkpoint": [RunFolder(u.run_dir).final_checkpoint() for u in units],
           "final_ba": m["balanced_accuracy"], "best_epoch_ba": float(np.mean([b for b, _ in best])),
           "best_epoch": [e for _, e in best], "weighted_logloss": m["weighted_logloss"],
           "confusion_matrix": m["confusion_matrix"],
           "per_level_recall": per_level_recall(y, p.argmax(axis=1), levels)}
    out.update({f"recall_{c}": m["recall"][c] for c in CLASS_NAMES})
    return out


def fit_oof_calibration(labels: np.ndarray, probs: np.ndarray, studies: np.ndarray) -> dict:
    """Temperature scaling fitted on out-of-fold probabilities with the competition weights,
    kept only where it lowers the loss cross-fitted over the studies."""
    labels = np.asarray(labels, dtype=np.int64)
    cal = calibration.fit_calibration(calibration.logits_from_probs(probs), labels,
                                      sample_weights(labels), groups=studies)
    return cal.to_dict()


def condition_summary(cond: str, units: Sequence[Unit], folds: pd.DataFrame, n_prior: int,
                      metrics: dict[str, pd.DataFrame]) -> dict:
    """Per fold and over folds, for one condition.

    Its calibration is fitted on the condition's out-of-fold rows of every fold pooled (seeds
    averaged): one calibration for the cross-validated model as a whole, which no run's own
    calibration.json (fitted on that run's validation fold only) can stand in for.
    """
    mine = folds[folds["condition"] == cond]
    per_fold = []
    for fold in sorted({u.fold for u in units if u.condition == cond}):
        fold_units = [u for u in units if u.condition == cond and u.fold == fold]
        per_fold.append(fold_summary(fold_units, mine[mine["fold"] == fold], metrics))
    return {"folds": per_fold, **{k: mean_std([f[k] for f in per_fold]) for k in FOLD_STATS},
            "n_rows_model": len(mine), "n_rows_prior": n_prior,
            "calibration": fit_oof_calibration(mine["label"].to_numpy(), mine[PROBS].to_numpy(),
                                               mine["study_id"].to_numpy())}


def run_calibration(unit: Unit, oof: pd.DataFrame, checkpoint: str) -> dict:
    """The run's own calibration: its calibration.json when that was fitted on
    ``checkpoint`` (what oof.csv scores), else a temperature fitted on ``oof`` here."""
    stored = load_calibration(RunFolder(unit.run_dir))
    if stored is not None and stored.checkpoint == checkpoint:
        return stored.calibration.to_dict()
    return fit_oof_calibration(oof["label"].to_numpy(), oof[PROBS].to_numpy(),
                               oof["study_id"].to_numpy())


def build_ensemble(units: Sequence[Unit], localizer: str | None, conditions: dict,
                   oofs: dict[str, pd.DataFrame]) -> Ensemble:
    """Every unit's run with an equal share of its condition's weight and its own calibration."""
    weights = equal_weights([u.condition for u in units])
    runs = []
    for u in units:
        checkpoint = RunFolder(u.run_dir).final_checkpoint()
        runs.append(EnsembleRun(u.run_dir, u.condition, u.fold, u.seed, weights[u.condition],
                                checkpoint, run_calibration(u, oofs[u.tag], checkpoint)))
    return Ensemble(tuple(runs), units[0].cfg.name, localizer,
                    {c: {"calibration": s["calibration"]} for c, s in conditions.items()})


def write_oof(path: Path, oof: pd.DataFrame) -> pd.DataFrame:
    """Write oof.csv atomically (full float precision) and return it as read back."""
    with atomic_path(path, suffix=".csv") as tmp:
        oof.to_csv(tmp, index=False)
    return pd.read_csv(path, dtype={ROW_ID: str})


def collect(units: Sequence[Unit], data_dir: Path, folder: CvFolder, *, localizer: str | None = None,
            n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """Write oof.csv, cv.json, cv.md, ensemble.yaml and report.html from finished units."""
    solution = solution_from_train(_read_train_csv(Path(data_dir)))
    oofs, metrics = read_run_files(units)
    folds = fold_predictions(unit_predictions(units, oofs))
    oof, source = assemble_oof(solution, folds, units[0].cfg.predict.prior_reweight)
    oof = write_oof(folder.oof, oof)
    meta = parse_row_ids(solution[ROW_ID])
    conditions = list(dict.fromkeys(u.condition for u in units))
    per_condition = {c: condition_summary(c, units, folds, int(((meta["condition"] == c).to_numpy()
                                                                & (source == "prior")).sum()),
                                                 metrics)
                     for c in conditions}
    summary = {"config": units[0].cfg.name, "data": str(Path(data_dir).resolve()),
               "folds": units[0].cfg.data.folds, "split_seed": units[0].cfg.data.split_seed,
               "seeds": sorted({u.seed for u in units}), "conditions": conditions,
               "n_rows": len(oof), "n_rows_model": int((source == "model").sum()),
               "score": score_intervals(solution, oof, n_boot, seed),
               "per_condition": per_condition,
               "runs": [{"tag": u.tag, "run_dir": str(u.run_dir)} for u in units]}
    rf.write_json(folder.cv_json, summary)
    atomic_write_text(folder.cv_md, cv_markdown(summary))
    write_ensemble(folder.ensemble, build_ensemble(units, localizer, per_condition, oofs))
    curves = {(u.condition, u.fold, u.seed): metrics[u.tag] for u in units}
    build_cv_report(folder.report, summary, curves)
    return summary


def _read_train_csv(data_dir: Path) -> pd.DataFrame:
    path = data_dir / TRAIN_CSV
    if not path.is_file():
        raise UserError(f"{path} not found: --data must be the dataset the caches came from")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
