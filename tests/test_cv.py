"""``spinegrade cv``: oof.csv, its score, reuse, resume after SIGKILL, --only + --collect,
the ensemble file, and the pieces (units, leave-one-study-out prior) on their own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from engine_fixtures import TINY_OVERRIDES, cli_args
from spinegrade.cli import main
from spinegrade.competition import competition_score, parse_row_ids, solution_from_train
from spinegrade.engine import cv
from spinegrade.engine.cv_results import assemble_oof, leave_one_study_out_prior
from spinegrade.engine.ensemble import (
    Ensemble,
    EnsembleRun,
    classifier_specs,
    read_ensemble,
    write_ensemble,
)
from spinegrade.engine.run_folder import RunFolder
from spinegrade.engine.train import KILL_ENV
from spinegrade.errors import UserError

SPINAL = "spinal_canal_stenosis"
# Two folds of one condition, two epochs each (SWA over the second): 2 small runs.
EXTRA = ("train.epochs=2", "train.swa_start_epoch=2", "train.augment=false")
CV_SETTINGS = ("--conditions", SPINAL, "--folds", "2", "--n-boot", "100", *cli_args(*EXTRA))


def _cv_args(synth_dir, out, *extra):
    return ["cv", "--data", str(synth_dir), "--out", str(out), "--config", "v8",
            "--cache-root", str(out.parent / "cache"), *CV_SETTINGS, *extra]


@pytest.fixture(scope="module")
def cv_once(synth_dir, tmp_path_factory):
    """One uninterrupted ``spinegrade cv`` call (its folder, shared by the tests below)."""
    out = tmp_path_factory.mktemp("cv") / "once"
    assert main(_cv_args(synth_dir, out)) == 0
    return out


@pytest.mark.slow
def test_oof_covers_every_labelled_row_and_scores_as_cv_json(synth_dir, cv_once, capsys):
    solution = solution_from_train(pd.read_csv(synth_dir / "train.csv"))
    oof = pd.read_csv(cv_once / "oof.csv", dtype={"row_id": str})
    assert list(oof.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    assert sorted(oof["row_id"]) == sorted(solution["row_id"])
    summary = json.loads((cv_once / "cv.json").read_text())
    assert main(["score", "--from-train", str(synth_dir / "train.csv"), str(cv_once / "oof.csv"),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert abs(printed["score"] - summary["score"]["total"]["estimate"]) < 1e-9
    total = summary["score"]["total"]
    assert total["low"] <= total["estimate"] <= total["high"]
    # Spinal rows come from the two folds' models (every spinal row with a crop), the other
    # conditions from the leave-one-study-out prior.
    spinal = summary["per_condition"][SPINAL]
    assert summary["n_rows_model"] == spinal["n_rows_model"] > 0
    assert [f["fold"] for f in spinal["folds"]] == [0, 1]
    assert spinal["final_ba"]["mean"] == pytest.approx(
        np.mean([f["final_ba"] for f in spinal["folds"]]))
    assert spinal["final_ba"]["std"] == pytest.approx(
        np.std([f["final_ba"] for f in spinal["folds"]], ddof=1))
    md = (cv_once / "cv.md").read_text()
    assert "final (SWA) BA" in md and "best-epoch BA (optimistic)" in md
    assert "fold 1: final BA" in (cv_once / "report.html").read_text()


@pytest.mark.slow
def test_second_call_trains_nothing(synth_dir, cv_once, capsys):
    ckpt = cv_once / "runs" / SPINAL / "fold0" / "checkpoints" / "swa.pt"
    before = ckpt.stat().st_mtime_ns
    oof_before = (cv_once / "oof.csv").read_text()
    capsys.readouterr()
    assert main(_cv_args(synth_dir, cv_once)) == 0
    assert "0 unit(s) trained, 2 reused" in capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns == before
    assert (cv_once / "oof.csv").read_text() == oof_before


@pytest.mark.slow
def test_only_then_collect_equals_one_call(synth_dir, cv_once, tmp_path):
    out = tmp_path / "split"
    assert main(_cv_args(synth_dir, out, "--collect")) == 2  # nothing trained yet
    assert main(_cv_args(synth_dir, out, "--only", f"{SPINAL}:1")) == 0
    assert main(_cv_args(synth_dir, out, "--only", f"{SPINAL}:0", "--collect")) == 0
    assert (out / "oof.csv").read_text() == (cv_once / "oof.csv").read_text()


@pytest.mark.slow
def test_sigkill_during_a_fold_then_same_call_gives_the_same_oof(synth_dir, cv_once, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "spinegrade.cli", *_cv_args(synth_dir, out)]
    killed = subprocess.run(cmd, env={**os.environ, KILL_ENV: "1"}, capture_output=True,
                            text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "oof.csv").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout
    assert (out / "oof.csv").read_text() == (cv_once / "oof.csv").read_text()


@pytest.mark.slow
def test_predict_with_the_ensemble_equals_classifier_flags(synth_dir, cv_once, tmp_path):
    from test_predict import make_localizer_run

    loc = make_localizer_run(tmp_path / "loc")
    ens = read_ensemble(cv_once / "ensemble.yaml")
    assert [r.fold for r in ens.runs] == [0, 1] and sum(r.weight for r in ens.runs) == 1.0
    assert ens.runs[0].calibration["temperature"] > 0
    for r in ens.runs:  # each run's own calibration.json, not a second fit
        stored = json.loads(RunFolder(r.path).calibration.read_text())
        assert r.calibration == stored["calibration"]
    common = ["predict", str(synth_dir), "--localizer", str(loc), "--no-progress",
              "--set", "predict.figures=false"]
    assert main([*common, "--ensemble", str(cv_once / "ensemble.yaml"),
                 "--out", str(tmp_path / "a.csv")]) == 0
    flags = [a for r in ens.runs for a in ("--classifier", f"{r.path}:{r.weight}")]
    assert main([*common, *flags, "--out", str(tmp_path / "b.csv")]) == 0
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert list(a["row_id"]) == list(b["row_id"])
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_one_subprocess_per_gpu_trains_the_same_runs(synth_dir, cv_once, tmp_path):
    # Two "GPUs": both units run at once as `spinegrade train` subprocesses (on CPU here,
    # each with its own CUDA_VISIBLE_DEVICES) and give the runs of the in-process call.
    units = cv.plan_units("v8", [SPINAL], tmp_path, folds=2, overrides=[*TINY_OVERRIDES, *EXTRA])
    caches = cv.prepare_caches(units, synth_dir, cv_once.parent / "cache")
    rows = cv.train_units(units, caches, gpus=2, logs=tmp_path / "logs")
    assert sorted(r["status"] for r in rows) == ["trained", "trained"]
    assert len(list((tmp_path / "logs").glob("*.log"))) == 2
    for u in units:
        ref = cv_once / "runs" / SPINAL / u.run_dir.name / "oof.csv"
        assert (u.run_dir / "oof.csv").read_text() == ref.read_text()


def test_a_run_folder_of_another_config_is_refused(tmp_path):
    units = cv.plan_units("v8", [SPINAL], tmp_path, folds=2)
    other = cv.plan_units("v8", [SPINAL], tmp_path, folds=2, overrides=["train.epochs=3", "train.swa_start_epoch=3"])
    from spinegrade.config import save_config

    units[0].run_dir.mkdir(parents=True)
    save_config(units[0].cfg, units[0].run_dir)
    assert cv.unit_state(units[0]) == "new"
    with pytest.raises(UserError, match="train.epochs"):
        cv.unit_state(other[0])


def test_plan_seeds_share_the_split_and_only_selects_units(tmp_path):
    units = cv.plan_units("v8", ["all"], tmp_path, folds=3, seeds=2)
    assert len(units) == 5 * 3 * 2
    assert {u.cfg.data.split_seed for u in units} == {42}
    assert {u.seed for u in units} == {42, 43} == {u.cfg.train.seed for u in units}
    assert len({u.run_dir for u in units}) == len(units)
    picked = cv.select_units(units, [f"{SPINAL}:1", f"{SPINAL}:2:43"])
    assert [(u.fold, u.seed) for u in picked] == [(1, 42), (1, 43), (2, 43)]
    with pytest.raises(UserError, match="no such unit"):
        cv.select_units(units, [f"{SPINAL}:7"])
    with pytest.raises(UserError, match="CONDITION:FOLD"):
        cv.select_units(units, ["spinal"])
    with pytest.raises(UserError, match="unknown"):
        cv.plan_units("v8", ["spinal"], tmp_path)


def _train(rows):
    cols = {f"{c}_{lv}": [] for c in ("spinal_canal_stenosis",) for lv in
            ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")}
    frame = pd.DataFrame({"study_id": [r[0] for r in rows]})
    for k, col in enumerate(cols):
        frame[col] = [r[1] if k == 0 else "Normal/Mild" for r in rows]
    for c in ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
              "left_subarticular_stenosis", "right_subarticular_stenosis"):
        for lv in ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"):
            frame[f"{c}_{lv}"] = "Normal/Mild"
    return frame


def test_leave_one_study_out_prior_by_hand():
    # Spinal L1/L2 over 4 studies: Normal, Normal, Moderate, Severe.
    sol = solution_from_train(_train([(1, "Normal/Mild"), (2, "Normal/Mild"), (3, "Moderate"),
                                      (4, "Severe")]))
    meta = parse_row_ids(sol["row_id"])
    labels = sol[["normal_mild", "moderate", "severe"]].to_numpy().argmax(axis=1)
    prior = leave_one_study_out_prior(meta, labels, reweight=True)
    at = sol["row_id"].to_numpy() == "1_spinal_canal_stenosis_l1_l2"
    # The fallback prior of predict (add-one, x [1, 2, 4], floor 1e-3: 1e-3 + 0.997 p).
    # The others of study 1: counts 1 / 1 / 1 -> 2 / 2 / 2 -> 2, 4, 8 -> 1/7, 2/7, 4/7.
    np.testing.assert_allclose(prior[at][0], 1e-3 + 0.997 * np.array([1, 2, 4]) / 7, atol=1e-8)
    at = sol["row_id"].to_numpy() == "4_spinal_canal_stenosis_l1_l2"
    # The others of study 4: 2 / 1 / 0 -> 3 / 2 / 1 -> 3, 4, 4 -> 3/11, 4/11, 4/11: no zero.
    np.testing.assert_allclose(prior[at][0], 1e-3 + 0.997 * np.array([3, 4, 4]) / 11, atol=1e-8)


def test_assemble_oof_puts_model_rows_in_place_and_checks_labels():
    sol = solution_from_train(_train([(1, "Normal/Mild"), (2, "Severe")]))
    folds = pd.DataFrame({"row_id": ["2_spinal_canal_stenosis_l1_l2"], "label": [2],
                          "prob_normal_mild": [0.1], "prob_moderate": [0.2], "prob_severe": [0.7]})
    oof, source = assemble_oof(sol, folds, reweight=True)
    row = oof.set_index("row_id").loc["2_spinal_canal_stenosis_l1_l2"]
    assert list(row) == [0.1, 0.2, 0.7]
    assert (source == "model").sum() == 1 and len(oof) == len(sol)
    assert np.isfinite(competition_score(sol, oof)["score"])
    with pytest.raises(UserError, match="another label"):
        assemble_oof(sol, folds.assign(label=0), reweight=True)


def test_ensemble_file_round_trip_gives_the_classifier_specs(tmp_path):
    runs = tuple(EnsembleRun(tmp_path / "runs" / f"fold{k}", SPINAL, k, 42, 1 / 3, "swa",
                             {"temperature": 1.5}) for k in range(3))
    path = write_ensemble(tmp_path / "ensemble.yaml", Ensemble(runs, "v8", None, {}))
    assert "path: runs/fold0" in path.read_text()  # relative: the folder can move
    shutil.move(tmp_path, tmp_path.parent / f"{tmp_path.name}-moved")
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    back = read_ensemble(moved / "ensemble.yaml")
    assert classifier_specs(back) == [f"{moved / 'runs' / f'fold{k}'}:{1 / 3!r}" for k in range(3)]
    assert back.runs[1].calibration == {"temperature": 1.5}
    (moved / "bad.yaml").write_text("format: 1\nruns: []\n")
    with pytest.raises(UserError, match="not an ensemble"):
        read_ensemble(moved / "bad.yaml")
