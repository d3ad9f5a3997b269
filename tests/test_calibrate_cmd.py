"""``spinegrade calibrate RUN``: a finished run's calibration refitted without retraining."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from engine_fixtures import make_cache, tiny_config
from spinegrade.cli import main
from spinegrade.constants import CLASS_NAMES, CLASS_WEIGHTS, LEVELS
from spinegrade.engine.calibrate import load_calibration
from spinegrade.engine.run_folder import RunFolder
from spinegrade.engine.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunFolder:
    root = tmp_path_factory.mktemp("calrun")
    cache = make_cache(root / "cache", n_studies=6)
    cfg = tiny_config("data.folds=2", "train.epochs=2", "train.freeze_epochs=1",
                      "train.swa_start_epoch=2")
    fit(cfg, cache.path, root / "run")
    return RunFolder(root / "run")


def _overconfident_oof(n: int, scale: float, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """oof.csv rows of a model whose logits are ``scale`` x the true ones, and the true
    logits; row ids past the cache's, so every cache row is a training row of the prior."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, 3))

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    y = np.array([rng.choice(3, p=p) for p in softmax(z)])
    oof = pd.DataFrame({"row": 10_000 + np.arange(n), "study_id": 5000 + np.arange(n) // 5,
                        "level": [LEVELS[i % 5] for i in range(n)], "label": y})
    for k, c in enumerate(CLASS_NAMES):
        oof[f"prob_{c}"] = softmax(scale * z)[:, k]
    return oof, y


def test_refit_recovers_the_temperature_and_updates_the_run(run, capsys):
    """An oof.csv made 3x overconfident: the refitted temperature is 3 (the truth of the
    construction), evaluate/predict read it back, final.json and the report follow, and the
    weighted log loss (sklearn) on those rows goes down."""
    oof, y = _overconfident_oof(4000, scale=3.0)
    oof.to_csv(run.oof, index=False)
    config_before = run.config.read_bytes()
    run.report.unlink()  # training wrote one; calibrate must write it again
    assert main(["calibrate", str(run.root), "--set", "eval.calibration=temperature"]) == 0
    assert "calibration.json (temperature" in capsys.readouterr().out
    rc = load_calibration(run)
    assert rc is not None and rc.method == "temperature"
    assert rc.calibration.temperature == pytest.approx(3.0, rel=0.1)
    final = json.loads(run.final.read_text())
    assert final["calibration"]["temperature"] == pytest.approx(rc.calibration.temperature)
    assert run.config.read_bytes() == config_before
    assert run.report.is_file() and "Calibration" in run.report.read_text()
    probs = oof[[f"prob_{c}" for c in CLASS_NAMES]].to_numpy()
    levels = np.arange(len(oof)) % 5
    w = np.asarray(CLASS_WEIGHTS)[y]
    before = log_loss(y, probs, sample_weight=w, labels=[0, 1, 2])
    after = log_loss(y, rc.probs(probs, levels), sample_weight=w, labels=[0, 1, 2])
    assert after < before - 0.05


def test_method_none_keeps_the_probabilities(run):
    oof, _ = _overconfident_oof(500, scale=3.0, seed=1)
    oof.to_csv(run.oof, index=False)
    assert main(["calibrate", str(run.root), "--set", "eval.calibration=none",
                 "--set", "eval.calibration_prior_mix=false"]) == 0
    c = load_calibration(run).calibration
    assert c.temperature == 1.0 and list(c.bias) == [0.0, 0.0, 0.0] and c.prior_mix == 0.0


def test_other_keys_and_unfinished_runs_are_user_errors(run, tmp_path, capsys):
    assert main(["calibrate", str(run.root), "--set", "train.epochs=3"]) == 2
    assert "not 'train.epochs=3'" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is missing" in err and "Traceback" not in err
