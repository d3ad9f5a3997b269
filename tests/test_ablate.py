"""The version comparison: planning, reuse of finished runs, and the summary table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spinegrade.constants import CLASS_PROB_COLUMNS
from spinegrade.engine import ablate


def _write_metrics(run_dir, epochs, never_predicts=None, best_epoch=2, seed=0):
    """A metrics.csv whose predictions never contain class ``never_predicts``."""
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(1, epochs + 1):
        counts = {"normal_mild": 80, "moderate": 12, "severe": 8}
        if never_predicts:
            counts[never_predicts] = 0
        rows.append(dict(
            epoch=e, balanced_accuracy=0.9 if e == best_epoch else 0.5 + 0.01 * rng.random(),
            recall_normal_mild=0.8 + 0.01 * e, recall_moderate=0.0 if never_predicts == "moderate"
            else 0.6, recall_severe=0.7, weighted_logloss=1.0 / e,
            **{f"pred_count_{k}": v for k, v in counts.items()},
            confusion_matrix=json.dumps([[1, 0, 0], [0, 1, 0], [0, 0, 1]])))
    run_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)


def test_dead_class_column_names_the_class_and_epochs(tmp_path):
    runs = ablate.plan_runs(["v5", "v8"], [0], tmp_path, preset="ablate-demo")
    for r in runs:
        _write_metrics(r.run_dir, r.cfg.train.epochs,
                       never_predicts="moderate" if r.label == "v5" else None)
    for r, swa_ba in zip(runs, (0.61, 0.7), strict=True):
        (r.run_dir / "final.json").write_text(json.dumps(
            {"final_checkpoint": "swa", "swa": {"balanced_accuracy": swa_ba}, "best_epoch": 2}))
    table = ablate.build_table(runs).set_index("Version")
    assert table.loc["v5", "Final-model BA"] == "0.610 ± 0.000 (swa)"
    assert table.loc["v8", "Final-model BA"] == "0.700 ± 0.000 (swa)"
    epochs = runs[0].cfg.train.epochs
    assert table.loc["v5", "Dead class?"] == (
        f"moderate (fold 0: ep {','.join(str(e) for e in range(1, epochs + 1))})")
    assert table.loc["v8", "Dead class?"] == "no"
    assert table.loc["v5", "Recall moderate"] == 0.0
    # Best BA is 0.9 at epoch 2 in both runs; recall there is 0.8 + 0.02.
    assert table.loc["v8", "Best BA"] == "0.900 ± 0.000"
    assert table.loc["v8", "Best epoch"] == "2"
    assert table.loc["v8", "Recall normal_mild"] == 0.82
    assert table.loc["v8", "Weighted log loss"] == 0.5


def test_plan_applies_preset_overrides_and_one_factor(tmp_path):
    runs = ablate.plan_runs(["v4"], [0, 1], tmp_path, preset="ablate-demo",
                            overrides=["train.epochs=3", "train.swa_start_epoch=3"], one_factor="v8")
    labels = sorted({r.label for r in runs})
    assert "v4" in labels and "v8:swa=off" in labels and "v8:sampler=weighted" in labels
    assert len(runs) == 2 * (1 + len(ablate.ONE_FACTOR_ABLATIONS))
    v4 = [r for r in runs if r.label == "v4"]
    assert [r.cfg.data.fold for r in v4] == [0, 1]
    assert all(r.cfg.train.epochs == 3 for r in runs)  # --set wins over the preset
    assert all(r.cfg.model.backbone == "test_efficientnet" for r in runs)  # preset
    swa_off = next(r for r in runs if r.label == "v8:swa=off")
    assert swa_off.cfg.train.swa is False
    assert len({r.run_dir for r in runs}) == len(runs)


def test_finished_runs_are_reused(tmp_path):
    runs = ablate.plan_runs(["v8"], [0], tmp_path, preset="ablate-demo")
    calls = []

    def fake_train(cfg, cache, run_dir, fold):
        calls.append(run_dir)
        _write_metrics(run_dir, cfg.train.epochs)

    first = ablate.execute(runs, tmp_path, fake_train)
    second = ablate.execute(runs, tmp_path, fake_train)
    assert list(first["status"]) == ["trained"]
    assert list(second["status"]) == ["reused"]
    assert len(calls) == 1
    # An unfinished run (fewer epochs than configured) is trained again.
    _write_metrics(runs[0].run_dir, runs[0].cfg.train.epochs - 1)
    assert list(ablate.execute(runs, tmp_path, fake_train)["status"]) == ["trained"]


def test_outputs_written(tmp_path):
    runs = ablate.plan_runs(["v6", "v8"], [0], tmp_path, preset="ablate-demo")
    for r in runs:
        _write_metrics(r.run_dir, r.cfg.train.epochs)
    ablate.write_outputs(runs, tmp_path)
    md = (tmp_path / "table.md").read_text()
    assert md.splitlines()[0].startswith("| Version | Architecture | Loss | Best BA | Final-model BA")
    assert "| n/a |" in md  # no final.json: the final model's BA is unknown, not invented
    assert "coral" in md  # v6's head shows in its architecture string
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "table.csv")) == 2


def test_each_version_gets_the_cache_of_its_data_settings(tmp_path):
    """v4-v7 crop tighter with one window, so they cannot share v8's cache."""
    import dataclasses

    from spinegrade.config import load_config
    from spinegrade.data.cache import META_FILE, cache_key
    from spinegrade.errors import UserError

    v4 = load_config("v4", preset="ablate-demo")
    v8 = load_config("v8", preset="ablate-demo")
    keys = {cfg.name: cache_key(dataclasses.asdict(cfg.data)) for cfg in (v4, v8)}
    assert keys["v4"] != keys["v8"]
    for cfg in (v5 := load_config("v5", preset="ablate-demo"), load_config("v7", preset="ablate-demo")):
        assert cache_key(dataclasses.asdict(cfg.data)) == keys["v4"]  # v4-v7 share one
    root = tmp_path / "caches"
    for key in keys.values():
        (root / key).mkdir(parents=True)
        (root / key / META_FILE).write_text("{}")
    assert ablate.cache_for(v4, root) == root / keys["v4"]
    assert ablate.cache_for(v5, root) == root / keys["v4"]
    assert ablate.cache_for(v8, root) == root / keys["v8"]
    # A single cache folder is used as it is (fit then checks its settings).
    assert ablate.cache_for(v4, root / keys["v8"]) == root / keys["v8"]
    (root / keys["v4"] / META_FILE).unlink()
    (root / keys["v8"] / META_FILE).unlink()
    try:
        ablate.cache_for(v4, root)
    except UserError as e:
        assert "--data" in str(e) and v4.data.condition in str(e)
    else:
        raise AssertionError("a missing cache must be a UserError")


def test_cache_for_finds_caches_keyed_by_settings_and_dataset(tmp_path):
    """``prepare`` names a cache by its settings *and* the dataset's fingerprint."""
    import dataclasses

    from spinegrade.config import load_config
    from spinegrade.data.cache import META_FILE, cache_key
    from spinegrade.errors import UserError

    v4, v8 = load_config("v4", preset="ablate-demo"), load_config("v8", preset="ablate-demo")
    root, fp = tmp_path / "caches", "0123456789abcdef"
    dirs = {}
    for cfg in (v4, v8):
        dirs[cfg.name] = root / cache_key(dataclasses.asdict(cfg.data), fp)
        dirs[cfg.name].mkdir(parents=True)
        (dirs[cfg.name] / META_FILE).write_text(json.dumps({"dataset": {"fingerprint": fp}}))
    assert dirs["v4"].name != cache_key(dataclasses.asdict(v4.data))  # not the settings-only key
    assert ablate.cache_for(v4, root) == dirs["v4"]
    assert ablate.cache_for(v8, root) == dirs["v8"]
    # The same settings prepared from a second dataset: which one is meant is not guessed.
    other = root / cache_key(dataclasses.asdict(v4.data), "fedcba9876543210")
    other.mkdir()
    (other / META_FILE).write_text(json.dumps({"dataset": {"fingerprint": "fedcba9876543210"}}))
    with pytest.raises(UserError, match="several datasets"):
        ablate.cache_for(v4, root)
    assert ablate.cache_for(v8, root) == dirs["v8"]


def test_preset_keeps_each_versions_training_recipe():
    from spinegrade.config import load_config

    v4, v8 = load_config("v4", preset="ablate-demo"), load_config("v8", preset="ablate-demo")
    assert (v4.train.batch_size, v4.train.freeze_epochs, v4.train.sampler) == (8, 0, "weighted")
    assert v4.train.lr_schedule == "cosine_restarts" and v4.train.mixup_alpha > 0
    assert (v4.data.crop_radius_scale, v4.data.window_channels) == (0.5, "single")
    assert (v8.train.batch_size, v8.train.freeze_epochs, v8.train.sampler) == (16, 2, "shuffle")
    assert (v8.data.crop_radius_scale, v8.data.window_channels) == (0.75, "three")
    assert v4.model.backbone == v8.model.backbone == "test_efficientnet"


def test_final_model_ba_without_swa_is_the_best_epochs(tmp_path):
    run = tmp_path / "r"
    _write_metrics(run, 4, best_epoch=3)
    ba, name = ablate.final_model_ba(run)
    assert np.isnan(ba) and name == ""  # no final.json yet
    (run / "final.json").write_text(json.dumps({"final_checkpoint": "best", "best_epoch": 3}))
    assert ablate.final_model_ba(run) == (0.9, "best")


def _write_oof(run_dir, labels, probs, studies):
    frame = pd.DataFrame({"row": np.arange(len(labels)), "study_id": studies, "level": "l1_l2",
                          "label": labels})
    for k, c in enumerate(("normal_mild", "moderate", "severe")):
        frame[f"prob_{c}"] = probs[:, k]
    frame.to_csv(run_dir / "oof.csv", index=False)


def test_paired_differences_to_the_reference_over_folds_and_seeds(tmp_path):
    from sklearn.metrics import balanced_accuracy_score

    runs = ablate.plan_runs(["v8", "v5", "v6"], [0, 1], tmp_path, preset="ablate-demo", seeds=2)
    assert len(runs) == 3 * 2 * 2 and {r.seed for r in runs} == {42, 43}
    assert len({r.run_dir for r in runs}) == len(runs)
    rng = np.random.default_rng(0)
    truth = {}
    for r in runs:
        _write_metrics(r.run_dir, r.cfg.train.epochs)
        n = 150  # per fold: 50 studies x 3 rows, the same rows for every version and seed
        y = rng.choice(3, n, p=[0.6, 0.25, 0.15]) if r.fold not in truth else truth[r.fold]
        truth[r.fold] = y
        good = np.eye(3)[y] * 0.8 + 0.2 / 3                       # always right
        noise = rng.dirichlet([1, 1, 1], size=n)                  # chance level
        probs = {"v8": good, "v5": good.copy(), "v6": noise}[r.label]
        _write_oof(r.run_dir, y, probs, 1000 * r.fold + np.arange(n) // 3)
    table = ablate.build_table(runs).set_index("Version")
    col = "Δ final BA vs v8 [95% CI]"
    assert table.loc["v8", col] == "reference"
    # v5 predicts exactly what v8 does: a zero difference, marked as not told apart from 0.
    assert table.loc["v5", col] == "+0.000 [+0.000, +0.000] (≈ 0)"
    # v6 is at chance: its BA is far below v8's 1.0, and the interval says so. The estimate
    # is the BA of all v6 rows pooled over folds x seeds (sklearn) minus v8's, which is 1.
    v6 = json.loads(table.loc["v6", "_ba_diff"])
    pooled = pd.concat([ablate._oof(r) for r in runs if r.label == "v6"])
    want = balanced_accuracy_score(pooled["label"], pooled[list(CLASS_PROB_COLUMNS)].to_numpy().argmax(1)) - 1
    assert v6["estimate"] == pytest.approx(want, abs=1e-12)
    assert v6["low"] <= want <= v6["high"] < 0 and "(≈ 0)" not in table.loc["v6", col]
    assert table.loc["v8", "Final-model BA"] == "1.000 ± 0.000"
    assert "(≈ 0) marks an interval that contains zero" in ablate.to_markdown(table.reset_index())
