"""A run's calibration: fitted on constructed out-of-fold predictions, stored in the run
folder, read back by ``predict``'s ClassifierRun and applied to what it grades."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from spinegrade import calibration as C
from spinegrade.choices import CALIBRATION_METHODS
from spinegrade.config import load_config
from spinegrade.constants import CLASS_NAMES, CLASS_WEIGHTS, LEVELS, PRIOR_FLOOR
from spinegrade.data.preprocess import CropRequest
from spinegrade.engine import calibrate as K
from spinegrade.engine.priors import level_prior
from spinegrade.engine.run_folder import RunFolder
from spinegrade.errors import UserError


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _oof_run(tmp_path, n: int, scale: float, seed: int = 0):
    """A run folder's oof.csv from a model whose logits are ``scale`` x the true ones
    (scale > 1: overconfident), plus an index with as many training rows."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, 3))
    y = np.array([rng.choice(3, p=p) for p in _softmax(z)])
    levels = rng.integers(0, 5, n)
    probs = _softmax(scale * z)
    oof = pd.DataFrame({"row": np.arange(n), "study_id": 1000 + np.arange(n) // 5,
                        "level": [LEVELS[i] for i in levels], "label": y})
    for k, c in enumerate(CLASS_NAMES):
        oof[f"prob_{c}"] = probs[:, k]
    train_labels = rng.choice(3, n, p=[0.7, 0.2, 0.1])
    train = pd.DataFrame({"row": n + np.arange(n), "level": [LEVELS[i] for i in levels],
                          "label": train_labels})
    index = pd.concat([oof[["row", "level", "label"]], train], ignore_index=True)
    run = RunFolder(tmp_path / "run")
    run.root.mkdir(parents=True)
    oof.to_csv(run.oof, index=False)
    return run, oof, index, train


def _weighted_log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    probs = probs / probs.sum(axis=1, keepdims=True)
    return log_loss(labels, probs, sample_weight=np.asarray(CLASS_WEIGHTS)[labels],
                    labels=[0, 1, 2])


def test_methods_are_the_config_choices():
    assert K.METHODS == CALIBRATION_METHODS


def test_level_prior_by_hand():
    """Add-one smoothed, x [1, 2, 4], floored: predict's fallback prior, so the prior mix is
    fitted against the numbers predict mixes in."""
    prior = level_prior([0, 0, 0, 1], [0, 0, 2, 1], reweight=True)
    f = PRIOR_FLOOR
    # L1/L2: counts 2/0/1 -> add-one 3/1/2 -> x [1, 2, 4] = 3/2/8 (of 13); L2/L3: 0/1/0 ->
    # 1/2/1 -> 1/4/4 (of 9); L3/L4..: the overall 2/1/1 -> 3/2/2 -> 3/4/8 (of 15).
    np.testing.assert_allclose(prior[0], f + (1 - 3 * f) * np.array([3, 2, 8]) / 13)
    np.testing.assert_allclose(prior[1], f + (1 - 3 * f) * np.array([1, 4, 4]) / 9)
    np.testing.assert_allclose(prior[4], f + (1 - 3 * f) * np.array([3, 4, 8]) / 15)


def test_overconfident_run_recovers_temperature_and_never_worsens(tmp_path):
    """Model logits 3x the truth: T = 3; with weights 1/2/4 the bias is log([1, 2, 4])."""
    run, oof, index, _ = _oof_run(tmp_path, 20000, scale=3.0)
    rc = K.calibrate_run(run, oof, index, method="temperature_bias", prior_mix=True,
                         reweight=True, checkpoint="swa", condition="spinal_canal_stenosis")
    cal = rc.calibration
    assert cal.temperature == pytest.approx(3.0, rel=0.05)
    np.testing.assert_allclose(cal.bias, np.log(CLASS_WEIGHTS) - math.log(CLASS_WEIGHTS[0]),
                               atol=0.12)
    probs, labels, levels = K.oof_arrays(oof)
    before = _weighted_log_loss(labels, probs)
    after = _weighted_log_loss(labels, rc.probs(probs, levels))
    assert cal.nll_before == pytest.approx(before, rel=1e-9)
    assert after == pytest.approx(cal.nll_after, rel=1e-9)
    assert after < before - 0.1
    assert cal.ece_after < cal.ece_before


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
@pytest.mark.parametrize("scale", [1.0, 0.3, 6.0])
def test_calibrated_oof_loss_never_worse(tmp_path, method, scale):
    run, oof, index, _ = _oof_run(tmp_path, 400, scale=scale, seed=int(10 * scale))
    rc = K.calibrate_run(run, oof, index, method=method, prior_mix=True, reweight=True,
                         checkpoint="best", condition="spinal_canal_stenosis")
    probs, labels, levels = K.oof_arrays(oof)
    assert _weighted_log_loss(labels, rc.probs(probs, levels)) <= (
        _weighted_log_loss(labels, probs) + 1e-9)
    if method == "none":
        assert rc.calibration.temperature == 1.0 and not any(rc.calibration.bias)


def test_prior_is_the_training_rows_per_level(tmp_path):
    run, oof, index, train = _oof_run(tmp_path, 300, scale=2.0)
    rc = K.calibrate_run(run, oof, index, method="temperature", prior_mix=False,
                         reweight=False, checkpoint="best", condition="spinal_canal_stenosis")
    at = train[train["level"] == LEVELS[2]]["label"]
    smoothed = (np.bincount(at, minlength=3) + 1) / (len(at) + 3)  # add-one, no reweighting
    np.testing.assert_allclose(rc.prior[2], PRIOR_FLOOR + (1 - 3 * PRIOR_FLOOR) * smoothed)
    assert rc.calibration.prior_mix == 0.0


def test_stages_are_cross_fitted_over_the_studies(tmp_path):
    """oof.csv's study_id groups the folds: 15 rows of 3 studies give 3 folds; 300 rows of an
    overconfident model keep the temperature over 5 folds, and the log line says so."""
    run, oof, index, _ = _oof_run(tmp_path, 300, scale=3.0, seed=3)
    rc = K.calibrate_run(run, oof, index, method="temperature", prior_mix=False,
                         reweight=True, checkpoint="best", condition="spinal_canal_stenosis")
    cal = rc.calibration
    assert cal.folds == 5 and cal.kept == ("temperature",) and cal.temperature > 2
    assert cal.cv_nll["temperature"] < cal.cv_nll["identity"]
    line = K.format_calibration(rc)
    assert "kept: temperature" in line and f"identity {cal.cv_nll['identity']:.4f}" in line
    small = K.calibrate_run(run, oof.iloc[:15], index, method="temperature", prior_mix=True,
                            reweight=True, checkpoint="best", condition="spinal_canal_stenosis")
    assert small.calibration.folds == 3  # studies 1000, 1001, 1002
    none = K.calibrate_run(run, oof, index, method="none", prior_mix=True, reweight=True,
                           checkpoint="best", condition="spinal_canal_stenosis")
    assert none.calibration.is_identity and none.calibration.kept == ()
    assert none.calibration.nll_after == none.calibration.nll_before


def test_survives_save_and_load(tmp_path):
    run, oof, index, _ = _oof_run(tmp_path, 2000, scale=4.0)
    rc = K.calibrate_run(run, oof, index, method="temperature_bias", prior_mix=True,
                         reweight=True, checkpoint="swa", condition="spinal_canal_stenosis")
    back = K.load_calibration(RunFolder(run.root))
    assert back.calibration == rc.calibration and back.checkpoint == "swa"
    np.testing.assert_array_equal(back.prior, rc.prior)
    probs, _, levels = K.oof_arrays(oof)
    np.testing.assert_array_equal(back.probs(probs, levels), rc.probs(probs, levels))
    assert json.loads(run.calibration.read_text())["method"] == "temperature_bias"


def test_damaged_file_is_a_user_error(tmp_path):
    run = RunFolder(tmp_path)
    assert K.load_calibration(run) is None
    run.calibration.write_text('{"method": "temperature"}')
    with pytest.raises(UserError, match="calibration.json"):
        K.load_calibration(run)


def test_predict_applies_the_stored_temperature(tmp_path, synth_dir):
    """ClassifierRun.load reads calibration.json; its grades are softmax(log p / T + b) of
    the uncalibrated ones, and predict.prior_mix < 0 takes the stored mix."""
    import torch

    from spinegrade.engine import predict as P
    from spinegrade.io.dicom import read_series
    from test_predict import make_classifier_run

    path = make_classifier_run(tmp_path / "clf")
    cal = C.Calibration(temperature=2.5, bias=(0.0, 0.4, 0.9), prior_mix=0.2)
    rc = K.RunCalibration(cal, "temperature_bias", "best", "spinal_canal_stenosis",
                          np.full((5, 3), 1 / 3))
    (path / "calibration.json").write_text(json.dumps(rc.to_dict()))
    pcfg = load_config("demo", ["predict.tta=false"]).predict
    plain = P.ClassifierRun.load(path, 1.0, P.dataclasses.replace(pcfg, calibrate=False),
                                 torch.device("cpu"))
    calibrated = P.ClassifierRun.load(path, 1.0, pcfg, torch.device("cpu"))
    assert plain.calibration is None
    assert calibrated.calibration.calibration.to_dict() == cal.to_dict()
    desc = pd.read_csv(synth_dir / "train_series_descriptions.csv")
    sag = desc[desc.series_description == "Sagittal T2/STIR"].iloc[0]
    vol = read_series(synth_dir / "train_images" / str(sag.study_id) / str(sag.series_id))
    mid = vol.instance_numbers[len(vol.instance_numbers) // 2]
    h, w = vol.slices[0].shape
    reqs = [(lv, CropRequest(int(mid), w / 2 + 3 * lv, h / 2)) for lv in range(3)]
    p0, p1 = plain.grade(vol, reqs, 8), calibrated.grade(vol, reqs, 8)
    for lv in range(3):
        expected = _softmax((np.log(p0[lv]) / 2.5 + np.array(cal.bias))[None])[0]
        np.testing.assert_allclose(p1[lv], expected, rtol=1e-6)
    assert pcfg.prior_mix < 0  # the default: each run's own choice
    assert K.prior_mix_of([calibrated], pcfg.prior_mix) == pytest.approx(0.2)
    assert K.prior_mix_of([plain], pcfg.prior_mix) == 0.0
    both = [calibrated, P.dataclasses.replace(plain, weight=3.0)]
    assert K.prior_mix_of(both, pcfg.prior_mix) == pytest.approx(0.2 / 4)
    assert K.prior_mix_of([calibrated], 0.05) == 0.05
