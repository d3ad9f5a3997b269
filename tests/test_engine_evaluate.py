"""``spinegrade evaluate``: TTA on/off, validation fold vs another cache, metrics.json contents."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from engine_fixtures import make_cache, tiny_config
from spinegrade.cli import main
from spinegrade.constants import CLASS_WEIGHTS
from spinegrade.engine.calibrate import load_calibration, oof_arrays
from spinegrade.engine.run_folder import RunFolder
from spinegrade.engine.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    cache = make_cache(root / "cache", n_studies=6)
    cfg = tiny_config("data.folds=2", "train.epochs=2", "train.freeze_epochs=1",
                      "train.swa_start_epoch=2", "train.head_lr=3e-3", "train.backbone_lr=1e-3")
    fit(cfg, cache.path, root / "run")
    return root


def test_run_folder_has_the_documented_files(run):
    r = run / "run"
    for name in ("config.yaml", "run.json", "split.csv", "metrics.csv", "health.json", "oof.csv",
                 "final.json", "checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/swa.pt"):
        assert (r / name).is_file(), name
    assert any((r / "tb").iterdir())
    metrics = pd.read_csv(r / "metrics.csv")
    for col in ("epoch", "phase", "lr_backbone", "lr_head", "train_loss", "val_loss",
                "balanced_accuracy", "recall_moderate", "pred_count_severe", "weighted_logloss",
                "dead_classes", "confusion_matrix", "slice_weights", "seconds"):
        assert col in metrics, col
    assert len(json.loads(metrics["slice_weights"].iloc[-1])) == 7
    oof = pd.read_csv(r / "oof.csv")
    assert list(oof.columns) == ["row", "study_id", "level", "label", "prob_normal_mild",
                                 "prob_moderate", "prob_severe"]
    assert oof["row"].is_unique and len(oof) == metrics["n_val"].iloc[-1]
    assert oof.filter(like="prob_").sum(axis=1).sub(1).abs().max() < 1e-5
    assert json.loads((r / "final.json").read_text())["final_checkpoint"] == "swa"
    health = json.loads((r / "health.json").read_text())
    assert {it["status"] for it in health["items"]} <= {"pass", "warn", "alarm", "pending"}
    assert len(health["items"]) == 6
    weights = json.loads((r / "run.json").read_text())["backbone_weights"]
    assert (weights["source"], weights["detail"]) == ("random", "model.pretrained=false")
    assert weights["backbone"] == "test_efficientnet" and weights["sha256"] is None


def test_evaluate_tta_on_and_off(run, capsys):
    r = run / "run"
    # Default: the final checkpoint final.json names (SWA here), as oof.csv and predict use.
    assert main(["evaluate", str(r), "--no-tta", "--no-calibration", "--out", str(run / "e0")]) == 0
    assert main(["evaluate", str(r), "--checkpoint", "swa", "--out", str(run / "e1")]) == 0
    plain = json.loads((run / "e0/metrics.json").read_text())
    tta = json.loads((run / "e1/metrics.json").read_text())
    for key in ("balanced_accuracy", "recall", "confusion_matrix", "weighted_logloss",
                "n_samples", "per_level_recall"):
        assert key in plain and key in tta
    assert (plain["tta"], plain["tta_views"], tta["tta"], tta["tta_views"]) == (False, 1, True, 5)
    assert plain["checkpoint"] == tta["checkpoint"] == "swa"
    assert plain["n_samples"] == tta["n_samples"] == len(pd.read_csv(r / "oof.csv"))
    assert plain["weighted_logloss"] != tta["weighted_logloss"]
    # Without TTA, the swa checkpoint re-scores exactly as training's out-of-fold predictions.
    preds = pd.read_csv(run / "e0/predictions.csv")
    oof = pd.read_csv(r / "oof.csv")
    pd.testing.assert_frame_equal(preds.drop(columns="level"), oof.drop(columns="level"),
                                  atol=1e-6)
    assert (run / "e1/confusion.png").is_file() and (run / "e1/per_level_recall.png").is_file()
    assert "TTA 5 views" in capsys.readouterr().out


def test_evaluate_scores_all_of_another_cache(run, tmp_path):
    other = make_cache(tmp_path / "other", n_studies=3, seed=5)
    assert main(["evaluate", str(run / "run"), "--cache", str(other.path), "--no-tta",
                 "--checkpoint", "best"]) == 0
    m = json.loads((run / "run/eval/metrics.json").read_text())
    assert m["n_samples"] == 15 and m["scored"].startswith("all of")
    assert sum(map(sum, m["confusion_matrix"])) == 15
    assert set(m["per_level_recall"]) == {"l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"}


def test_evaluate_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--checkpoint", "last"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_calibration_is_fitted_stored_reported_and_applied(run):
    """After training: calibration.json from oof.csv, in final.json and report.html; evaluate
    applies exactly it (no TTA: the swa checkpoint reproduces oof.csv before calibrating)."""
    r = run / "run"
    rc = load_calibration(RunFolder(r))
    assert rc is not None and rc.checkpoint == "swa" and rc.method == "temperature"
    oof = pd.read_csv(r / "oof.csv")
    probs, labels, levels = oof_arrays(oof)
    w = np.asarray(CLASS_WEIGHTS)[labels]
    # oof.csv holds rounded probabilities; sklearn wants rows summing to one exactly.
    before = log_loss(labels, probs / probs.sum(1, keepdims=True), sample_weight=w,
                      labels=[0, 1, 2])
    after = log_loss(labels, rc.probs(probs, levels), sample_weight=w, labels=[0, 1, 2])
    assert rc.calibration.nll_before == pytest.approx(before, rel=1e-6)
    assert after == pytest.approx(rc.calibration.nll_after, rel=1e-6) and after <= before
    final = json.loads((r / "final.json").read_text())
    assert final["calibration"]["temperature"] == pytest.approx(rc.calibration.temperature)
    page = (r / "report.html").read_text()
    assert "Calibration" in page and "ECE" in page and (r / "plots/reliability.png").is_file()
    # Stages judged cross-fitted over oof.csv's studies: one fold per study, at most 5.
    assert rc.calibration.folds == min(5, oof["study_id"].nunique())
    assert f"cross-fitted over {rc.calibration.folds} folds" in page

    assert main(["evaluate", str(r), "--checkpoint", "swa", "--no-tta", "--out",
                 str(run / "ec")]) == 0
    m = json.loads((run / "ec/metrics.json").read_text())
    assert m["calibration"]["applied"] is True
    assert m["calibration"]["uncalibrated_weighted_logloss"] == pytest.approx(before, rel=1e-5)
    assert m["weighted_logloss"] == pytest.approx(after, rel=1e-5)
    preds = pd.read_csv(run / "ec/predictions.csv")
    np.testing.assert_allclose(preds.filter(like="prob_").to_numpy(),
                               rc.probs(probs, levels), atol=1e-6)
