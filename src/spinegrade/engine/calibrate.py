"""A run's calibration: fitted on its out-of-fold predictions, stored, read back and applied.

After training, :func:`calibrate_run` fits a temperature (``eval.calibration=temperature``),
or a temperature and a per-class bias (``temperature_bias``), on the final model's
out-of-fold predictions (``oof.csv``: the validation fold, i.e. crops the model never
trained on), with the competition's sample weights 1/2/4; then, with
``eval.calibration_prior_mix``, the weight of the per-level training prior mixed into every
prediction (what ``predict.prior_mix`` < 0 uses). Every stage is kept only where it lowers
the weighted out-of-fold log loss cross-fitted over ``eval.calibration_folds`` folds of the
studies (fitted on the other folds' studies) and on all of them
(:func:`spinegrade.calibration.fit_calibration`), so the stored calibration never makes the
out-of-fold loss worse and a stage that only fits noise is dropped. It goes to
``calibration.json`` in the run folder with the prior it was chosen against
(:func:`spinegrade.engine.priors.level_prior`, the prior ``predict`` mixes in);
``evaluate`` and ``predict`` apply it.

The scores calibrated are log-probabilities: softmax(log p / T) equals softmax(z / T) for
p = softmax(z), and works for probability outputs averaged over TTA views too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinegrade import calibration as C
from spinegrade.config import Config, load_config
from spinegrade.constants import CLASS_PROB_COLUMNS, LEVELS, NUM_CLASSES
from spinegrade.engine.priors import default_prior, rows_prior
from spinegrade.engine.rerun import open_run_cache
from spinegrade.engine.run_folder import RunFolder, write_json, write_report
from spinegrade.errors import UserError
from spinegrade.metrics import sample_weights

log = logging.getLogger(__name__)

# eval.calibration values (choices.CALIBRATION_METHODS names them for the config).
NO_CALIBRATION, TEMPERATURE, TEMPERATURE_BIAS = "none", "temperature", "temperature_bias"
METHODS = (NO_CALIBRATION, TEMPERATURE, TEMPERATURE_BIAS)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RunCalibration:
    """What ``calibration.json`` holds.

    Attributes:
        calibration: temperature, bias, prior mix and the fit's before/after figures.
        method: ``eval.calibration`` of the fit.
        checkpoint: the checkpoint whose out-of-fold predictions it was fitted on.
        condition: the run's condition.
        prior: (5, 3) per-level prior the mix was chosen against (training labels,
            :func:`~spinegrade.engine.priors.level_prior`).
    """

    calibration: C.Calibration
    method: str
    checkpoint: str
    condition: str
    prior: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "method": self.method,
                "checkpoint": self.checkpoint, "condition": self.condition,
                "prior": np.asarray(self.prior).tolist(),
                "calibration": self.calibration.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunCalibration:
        prior = np.asarray(d["prior"], dtype=np.float64)
        if prior.shape != (len(LEVELS), NUM_CLASSES):
            raise ValueError(f"prior must be {len(LEVELS)}x{NUM_CLASSES}, got {prior.shape}")
        return cls(C.Calibration.from_dict(d["calibration"]), str(d["method"]),
                   str(d["checkpoint"]), str(d["condition"]), prior)

    def probs(self, probs: np.ndarray, level_idx: Sequence[int] | None = None,
              mix: bool = True) -> np.ndarray:
        """Calibrated (n, 3) probabilities of model probabilities (n, 3).

        Args:
            probs: the model's probabilities.
            level_idx: (n,) level of each row, for the prior mix.
            mix: also mix in the prior by ``calibration.prior_mix`` (needs ``level_idx``).
        """
        cal = self.calibration if mix else dataclasses.replace(self.calibration, prior_mix=0.0)
        prior = None
        if cal.prior_mix > 0:
            if level_idx is None:
                raise ValueError("the prior mix needs each row's level")
            prior = self.prior[np.asarray(level_idx, dtype=np.int64)]
        return C.apply(C.logits_from_probs(probs), cal, prior)


def oof_arrays(oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs (n, 3), labels (n,), level index (n,)) of an oof.csv / predictions.csv frame."""
    probs = oof[list(CLASS_PROB_COLUMNS)].to_numpy(dtype=np.float64)
    levels = oof["level"].map({name: i for i, name in enumerate(LEVELS)})
    if levels.isna().any():
        raise ValueError(f"unknown level names {sorted(set(oof['level'][levels.isna()]))}")
    return probs, oof["label"].to_numpy(dtype=np.int64), levels.to_numpy(dtype=np.int64)


def fit_oof(probs: np.ndarray, labels: np.ndarray, levels: np.ndarray, prior: np.ndarray,
            method: str, prior_mix: bool, n_bins: int = C.DEFAULT_BINS,
            folds: int = C.DEFAULT_FOLDS, groups: np.ndarray | None = None) -> C.Calibration:
    """The calibration of out-of-fold probabilities (weights 1/2/4 by true grade).

    ``method`` none keeps the identity (its before/after figures still measured);
    ``prior_mix`` also chooses the weight of ``prior[levels]``; each stage is judged
    cross-fitted over ``folds`` folds of ``groups`` (the study of each row).
    """
    w = sample_weights(labels)
    scores = C.logits_from_probs(probs)
    fit = method != NO_CALIBRATION
    rows = np.asarray(prior)[levels] if prior_mix and fit else None
    return C.fit_calibration(scores, labels, w, temperature=fit,
                             bias=method == TEMPERATURE_BIAS, prior=rows, n_bins=n_bins,
                             folds=folds, groups=groups)


def calibrate_run(run: Any, oof: pd.DataFrame, index: pd.DataFrame, *, method: str,
                  prior_mix: bool, reweight: bool, checkpoint: str, condition: str,
                  n_bins: int = C.DEFAULT_BINS, folds: int = C.DEFAULT_FOLDS
                  ) -> RunCalibration:
    """Fit the run's calibration on ``oof`` and write ``run.calibration`` (calibration.json).

    Args:
        run: the :class:`~spinegrade.engine.run_folder.RunFolder`.
        oof: out-of-fold predictions (the ``oof.csv`` frame).
        index: the crop cache index; its rows not in ``oof`` are the training rows whose
            labels give the per-level prior (:func:`~spinegrade.engine.priors.rows_prior`).
        method: ``none`` / ``temperature`` / ``temperature_bias``.
        prior_mix: also choose the prior mix.
        reweight: prior times [1, 2, 4] (``predict.prior_reweight``).
        checkpoint: the checkpoint that made ``oof``.
        condition: the run's condition.
        n_bins: bins of the reported ECE.
        folds: cross-fitting folds over ``oof``'s studies (``eval.calibration_folds``).
    """
    prior = rows_prior(index[~index["row"].isin(oof["row"])], reweight)
    if prior is None:  # no training labels: predict falls back to the same
        prior = default_prior(condition, reweight)
    probs, labels, levels = oof_arrays(oof)
    groups = oof["study_id"].to_numpy() if "study_id" in oof else None
    cal = fit_oof(probs, labels, levels, prior, method, prior_mix, n_bins, folds, groups)
    rc = RunCalibration(cal, method, checkpoint, condition, prior)
    write_json(run.calibration, rc.to_dict())
    return rc


def calibrate_after_training(cfg: Config, run: Any, index: pd.DataFrame, checkpoint: str
                             ) -> RunCalibration | None:
    """:func:`calibrate_run` on the run's oof.csv as ``cfg.eval`` says, with a log line;
    None (and a warning) when it cannot be fitted: that must not lose a finished run."""
    ecfg = cfg.eval
    try:
        rc = calibrate_run(run, pd.read_csv(run.oof), index, method=ecfg.calibration,
                           prior_mix=ecfg.calibration_prior_mix,
                           reweight=cfg.predict.prior_reweight, checkpoint=checkpoint,
                           condition=cfg.data.condition, n_bins=ecfg.calibration_bins,
                           folds=ecfg.calibration_folds)
    except (ValueError, KeyError, FloatingPointError) as e:
        log.warning("could not calibrate %s: %s", run.root, e)
        return None
    print(format_calibration(rc), flush=True)
    return rc


# What `spinegrade calibrate` may override: how the calibration is fitted, nothing else.
RECALIBRATE_KEYS = ("eval.calibration", "eval.calibration_prior_mix", "eval.calibration_bins",
                    "eval.calibration_folds", "predict.prior_reweight")


def recalibrate(run_dir: str | Path, overrides: Sequence[str] = (),
                cache: str | Path | None = None) -> RunCalibration:
    """Refit a finished run's calibration on its ``oof.csv``, without retraining.

    The run's saved config with ``overrides`` (only :data:`RECALIBRATE_KEYS`) says how; the
    crop cache (``run.json``'s, or ``cache``) gives the training labels of the prior. Writes
    ``calibration.json`` (what ``evaluate`` and ``predict`` apply), updates ``final.json``'s
    ``calibration`` and rebuilds ``report.html``; the config.yaml of the training is kept.

    Raises:
        UserError: not a finished run, an override of another key, or no readable cache.
    """
    run = RunFolder(Path(run_dir))
    for path in (run.config, run.final, run.oof):
        if not path.is_file():
            raise UserError(f"{path} is missing: {run.root} is not a finished training run "
                            "(train it first, or give the folder `spinegrade train --out` made)")
    other = [o for o in overrides if o.split("=", 1)[0].strip() not in RECALIBRATE_KEYS]
    if other:
        raise UserError(f"calibrate only changes {', '.join(RECALIBRATE_KEYS)}; not {other[0]!r}")
    cfg = load_config(run.config, list(overrides))
    try:
        index = open_run_cache(run, cache).index
    except OSError as e:
        raise UserError(f"cannot read the training cache of {run.root} ({e}); pass --cache "
                        "with the cache the run was trained on") from None
    rc = calibrate_after_training(cfg, run, index, run.final_checkpoint())
    if rc is None:
        raise UserError(f"could not calibrate {run.root} (see the warning above)")
    final = json.loads(run.final.read_text())
    final["calibration"] = rc.calibration.to_dict()
    write_json(run.final, final)
    write_report(run)
    return rc


def load_calibration(run: Any, checkpoint: str | None = None) -> RunCalibration | None:
    """The run's ``calibration.json``, or None when it has none; with ``checkpoint``, a
    warning when it was fitted on another checkpoint's predictions.

    Raises:
        UserError: the file exists but cannot be read (names the file and the fix).
    """
    path = Path(run.calibration)
    if not path.is_file():
        return None
    try:
        rc = RunCalibration.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a valid calibration file ({e}); delete it to use the "
                        "uncalibrated model, or retrain the run") from None
    log.info("%s: %s", run.root, format_calibration(rc))
    if checkpoint is not None and rc.checkpoint != checkpoint:
        log.warning("%s was fitted on the %s checkpoint; applying it to %s", path,
                    rc.checkpoint, checkpoint)
    return rc


def prior_mix_of(runs: Sequence[Any], prior_mix: float) -> float:
    """``prior_mix`` (``predict.prior_mix``), or when it is < 0 the weighted mean of the
    runs' chosen mixes (``run.weight``, ``run.calibration``; 0 for a run without one)."""
    if prior_mix >= 0:
        return prior_mix
    total = sum(r.weight for r in runs)
    return sum(r.weight * (r.calibration.calibration.prior_mix if r.calibration else 0.0)
               for r in runs) / total


def format_calibration(rc: RunCalibration) -> str:
    """One log line: the fitted values, the out-of-fold loss and ECE before and after, and
    which stages the cross-fitting kept."""
    c = rc.calibration
    bias = "/".join(f"{b:+.2f}" for b in c.bias)
    line = (f"calibration ({rc.method}, on {c.n} out-of-fold samples): temperature "
            f"{c.temperature:.3f}, bias {bias}, prior mix {c.prior_mix:.3f}; weighted log loss "
            f"{c.nll_before:.4f} -> {c.nll_after:.4f}, ECE {c.ece_before:.4f} -> "
            f"{c.ece_after:.4f}")
    if c.kept is not None:
        line += f"; kept: {', '.join(c.kept) or 'nothing'}"
    if c.cv_nll:
        line += f" ({c.folds}-fold cross-fitted log loss " + ", ".join(
            f"{k} {v:.4f}" for k, v in c.cv_nll.items()) + ")"
    return line
