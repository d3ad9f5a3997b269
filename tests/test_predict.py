"""``spinegrade predict``: priors, parsing, and the whole path on synthetic DICOM studies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spinegrade.config import config_to_dict, load_config, save_config
from spinegrade.constants import (
    CLASS_BALANCE,
    CONDITIONS,
    LEVELS,
    PRIOR_FLOOR,
    SUBMISSION_COLUMNS,
    row_id,
)
from spinegrade.engine import predict as P
from spinegrade.engine.checkpoint import save_checkpoint

TINY_LOCALIZER = ["localizer.img_size=64", "localizer.heatmap_stride=4",
                  "localizer.decoder_channels=8", "localizer.max_stride=16",
                  "localizer.min_score=0.0"]
TINY_CLASSIFIER = ["model.backbone=resnet10t", "model.level_embed_dim=8", "eval.tta=true"]


def make_localizer_run(out: Path) -> Path:
    """An untrained localizer run (every task), min_score 0 so every level is 'located'."""
    from spinegrade.engine import localizer as L

    cfg = load_config("localizer", TINY_LOCALIZER)
    save_config(cfg, out)
    torch.manual_seed(0)
    for desc in cfg.localizer.series:
        task = L.make_task(desc)
        model = L.build_localizer(cfg.localizer, task, for_inference=True)
        L.save_localizer_checkpoint(out / task.name / "checkpoints" / "best.pt", cfg, task,
                                    model, epoch=0)
    return out


def make_classifier_run(out: Path, condition: str = "spinal_canal_stenosis",
                        extra: tuple[str, ...] = ()) -> Path:
    """A tiny random classifier run folder written through the checkpoint API."""
    from spinegrade.models import build_model

    cfg = load_config("demo", [*TINY_CLASSIFIER, f"data.condition={condition}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model, n_slices=cfg.data.n_slices)
    save_config(cfg, out)
    save_checkpoint(out / "checkpoints" / "best.pt",
                    {"config": config_to_dict(cfg), "epoch": 1, "fold": 0,
                     "model": model.state_dict()})
    return out


def test_parse_classifier_spec(tmp_path):
    assert P.parse_classifier_spec(str(tmp_path)) == (tmp_path, 1.0)
    assert P.parse_classifier_spec(f"{tmp_path}:0.7") == (tmp_path, 0.7)
    with pytest.raises(P.UserError):
        P.parse_classifier_spec(str(tmp_path / "missing"))


def test_priors_are_distributions_and_reweighted():
    f = PRIOR_FLOOR
    plain = P.default_prior("spinal_canal_stenosis", reweight=False)
    assert plain.shape == (len(LEVELS), 3)
    balance = np.array(CLASS_BALANCE["spinal_canal_stenosis"])
    np.testing.assert_allclose(plain[0], f + (1 - 3 * f) * balance / balance.sum(), atol=1e-12)
    # Add-one on the counts (9, 2, 2), reweighted by 1/2/4 -> (9, 4, 8) / 21, then the floor.
    rew = P.prior_probs(np.array([8.0, 1.0, 1.0]), reweight=True)
    np.testing.assert_allclose(rew, f + (1 - 3 * f) * np.array([9.0, 4.0, 8.0]) / 21.0)


def _run_with_cache(tmp_path: Path):
    """A run folder whose crop cache has four studies; study 1003 is the validation fold."""
    from spinegrade.data.cache import CropCache
    from spinegrade.engine.run_folder import RunFolder, write_json

    labels = {1000: [0, 1, 2, 1, 0], 1001: [0, 0, 1, 2, 0], 1002: [1, 2, 0, 0, 0],
              1003: [2, 2, 2, 2, 2]}  # 1003 is the validation fold: its Severe L5/S1 is unseen
    rows = [{"study_id": st, "level": lv, "level_idx": i, "label": lab[i]}
            for st, lab in labels.items() for i, lv in enumerate(LEVELS)]
    cache = CropCache.create(tmp_path / "cache", np.zeros((len(rows), 1, 3, 4, 4), np.uint8),
                             pd.DataFrame(rows), {"img_size": 4, "n_slices": 1})
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    write_json(run.run_info, {"cache": str(cache.path), "fold": 0})
    pd.DataFrame({"study_id": list(labels), "fold": [1, 2, 1, 0]}).to_csv(run.split, index=False)
    return run, CropCache.open(cache.path).index


def test_fallback_prior_of_a_level_without_moderate_or_severe_is_smoothed(tmp_path):
    """Training folds with only Normal/Mild at L5/S1 must not give exact zeros (one such
    fallback row would cost ~34 nats under the metric's eps clipping)."""
    run, _ = _run_with_cache(tmp_path)
    prior = P.training_prior(run.root, "spinal_canal_stenosis", None, reweight=True)
    f = PRIOR_FLOOR
    # L5/S1 training counts (3, 0, 0) -> add-one (4, 1, 1) -> x (1, 2, 4) = (4, 2, 4) / 10.
    np.testing.assert_allclose(prior[4], f + (1 - 3 * f) * np.array([0.4, 0.2, 0.4]))
    # L1/L2 counts (2, 1, 0) -> (3, 2, 1) -> (3, 4, 4) / 11.
    np.testing.assert_allclose(prior[0], f + (1 - 3 * f) * np.array([3.0, 4.0, 4.0]) / 11.0)
    assert prior.min() >= PRIOR_FLOOR
    np.testing.assert_allclose(prior.sum(axis=1), 1.0)
    plain = P.training_prior(run.root, "spinal_canal_stenosis", None, reweight=False)
    assert plain.min() >= PRIOR_FLOOR  # no zero without the reweighting either


@pytest.mark.parametrize("reweight", [True, False])
def test_prior_mix_is_fitted_against_the_prior_predict_mixes_in(tmp_path, reweight):
    """calibrate_run (the prior mix's fit, on the validation fold's oof.csv) and predict's
    training_prior (its apply) give the same per-level prior of the same training rows."""
    from spinegrade.constants import CLASS_NAMES
    from spinegrade.engine import calibrate as K

    run, index = _run_with_cache(tmp_path)
    oof = index[index["study_id"] == 1003][["row", "study_id", "level", "label"]].copy()
    for k, c in enumerate(CLASS_NAMES):
        oof[f"prob_{c}"] = [0.6, 0.3, 0.1][k]
    rc = K.calibrate_run(run, oof, index, method="temperature", prior_mix=True,
                         reweight=reweight, checkpoint="best", condition="spinal_canal_stenosis")
    applied = P.training_prior(run.root, "spinal_canal_stenosis", None, reweight=reweight)
    np.testing.assert_array_equal(rc.prior, applied)
    assert rc.prior.min() >= PRIOR_FLOOR
    assert rc.calibration.folds == 1  # one validation study: nothing judged, nothing kept


def test_series_type_from_dicom_descriptions():
    assert P.series_type("Sagittal T2/STIR") == "Sagittal T2/STIR"
    assert P.series_type("SAG STIR") == "Sagittal T2/STIR"
    assert P.series_type("t1_tse_sag") == "Sagittal T1"
    assert P.series_type("anything", "AX") == "Axial T2"
    assert P.series_type("localizer") is None


def test_submission_rows_cover_25_cells_and_sum_to_one():
    probs = {(c, lv): np.array([2.0, 1.0, 1.0]) for c in CONDITIONS for lv in range(5)}
    res = P.StudyResult("42", probs, {k: "model" for k in probs}, pd.DataFrame(), {})
    rows = pd.DataFrame(P.submission_rows(res))
    assert list(rows.columns) == list(SUBMISSION_COLUMNS) and len(rows) == 25
    assert rows.iloc[0]["row_id"] == row_id(42, CONDITIONS[0], LEVELS[0])
    np.testing.assert_allclose(rows[list(SUBMISSION_COLUMNS[1:])].sum(axis=1), 1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"localizer": make_localizer_run(root / "loc"),
            "spinal": make_classifier_run(root / "spinal"),
            # Same condition, other crop size: each run must crop with its own data config.
            "spinal48": make_classifier_run(root / "spinal48", extra=("data.img_size=48",))}


@pytest.mark.slow
def test_predict_dataset_with_broken_studies(synth_dir, runs, tmp_path):
    from spinegrade.competition import competition_score

    data = tmp_path / "data"
    shutil.copytree(synth_dir / "test_images", data / "test_images")
    shutil.copy(synth_dir / "test_series_descriptions.csv", data)
    desc = pd.read_csv(data / "test_series_descriptions.csv")
    studies = sorted(desc["study_id"].unique())
    assert len(studies) >= 2
    # Study 0 loses its Sagittal T2/STIR folder; study 1's Sagittal T1 files become garbage.
    s0 = desc[(desc.study_id == studies[0]) & (desc.series_description == "Sagittal T2/STIR")]
    shutil.rmtree(data / "test_images" / str(studies[0]) / str(s0.series_id.iloc[0]))
    s1 = desc[(desc.study_id == studies[1]) & (desc.series_description == "Sagittal T1")]
    for f in (data / "test_images" / str(studies[1]) / str(s1.series_id.iloc[0])).iterdir():
        f.write_bytes(b"not a dicom file")

    # The untrained localizer's discs are no spine: the anatomy checks would refuse them all
    # (tests/test_predict_anatomy.py); here the broken-study plumbing is under test.
    cfg = load_config("v8", ["predict.tta=false", "predict.check_anatomy=false"])
    out = P.predict([str(runs["spinal"]), f"{runs['spinal48']}:0.5"], runs["localizer"],
                    tmp_path / "sub" / "submission.csv", cfg.predict, data_dir=data,
                    progress=False)
    sub = pd.read_csv(tmp_path / "sub" / "submission.csv")
    assert len(sub) == 25 * len(studies) and sub["row_id"].is_unique
    np.testing.assert_allclose(sub[list(SUBMISSION_COLUMNS[1:])].sum(axis=1), 1.0, atol=1e-5)
    problems = pd.read_csv(tmp_path / "sub" / "submission_problems.csv")
    assert {"missing_series", "unreadable_series"} <= set(problems["kind"])
    by_study = {r.study_id: r for r in out.results}
    broken = by_study[str(studies[0])]
    assert all(broken.source[("spinal_canal_stenosis", lv)].startswith("prior")
               for lv in range(5))
    healthy = by_study[str(studies[-1])] if len(studies) > 2 else by_study[str(studies[1])]
    assert healthy.source[("spinal_canal_stenosis", 0)] == "model"
    assert healthy.source[("left_subarticular_stenosis", 0)] == "prior: no classifier"
    assert (tmp_path / "sub" / "submission_figures" / f"{studies[-1]}.png").is_file()
    assert (tmp_path / "sub" / "submission_studies.csv").is_file()
    assert (tmp_path / "sub" / "submission_locations.csv").is_file()
    assert not (tmp_path / "sub" / "problems.csv").exists()
    solution = pd.read_csv(synth_dir / "solution.csv")
    score = competition_score(solution, sub)
    assert np.isfinite(score["score"])


@pytest.mark.slow
def test_predict_one_study_folder_prints_grades(synth_dir, runs, tmp_path, capsys):
    from spinegrade.cli import main

    study = sorted((synth_dir / "test_images").iterdir())[0]
    out = tmp_path / "one.csv"
    assert main(["predict", "--study", str(study), "--classifier", str(runs["spinal"]),
                 "--localizer", str(runs["localizer"]), "--out", str(out), "--no-progress",
                 "--set", "predict.tta=false"]) == 0
    printed = capsys.readouterr().out
    assert "level" in printed and "grade" in printed and "l5_s1" in printed
    sub = pd.read_csv(out)
    assert len(sub) == 25 and sub["row_id"].str.startswith(study.name).all()
    assert load_config(tmp_path / "one_config.yaml").predict.tta is False
    # A second --study prediction into the same folder keeps the first one's side files.
    other = sorted((synth_dir / "test_images").iterdir())[1]
    assert main(["predict", "--study", str(other), "--classifier", str(runs["spinal"]),
                 "--localizer", str(runs["localizer"]), "--out", str(tmp_path / "two.csv"),
                 "--no-progress", "--set", "predict.tta=false"]) == 0
    for stem, st in (("one", study), ("two", other)):
        located = pd.read_csv(tmp_path / f"{stem}_locations.csv")
        assert set(located["study_id"].astype(str)) == {st.name}
        assert (tmp_path / f"{stem}_problems.csv").is_file()
        timing = pd.read_csv(tmp_path / f"{stem}_studies.csv")
        assert timing["study_id"].astype(str).tolist() == [st.name]


@pytest.mark.parametrize("content", ["empty", "junk"])
def test_predict_study_without_readable_series_is_an_error(tmp_path, capsys, content):
    from spinegrade.cli import main

    study = tmp_path / "12345"
    study.mkdir()
    if content == "junk":
        (study / "777").mkdir()
        (study / "777" / "1.dcm").write_bytes(b"not a dicom file")
    out = tmp_path / "sub.csv"
    code = main(["predict", "--study", str(study), "--localizer", str(tmp_path / "loc"),
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no readable DICOM series" in err and str(study) in err
    assert "Traceback" not in err and not out.exists()
