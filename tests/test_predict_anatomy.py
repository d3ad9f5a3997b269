"""Refusing what is not a lumbar spine: header anatomy, the disc chain and cross-series
agreement in ``predict``; real DICOM of other anatomy is never graded by the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_fixtures import write_series
from spinegrade.config import load_config
from spinegrade.constants import (
    CONDITIONS,
    LEVEL_TITLE_TO_INDEX,
    LEVELS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    TITLE_TO_CONDITION,
)
from spinegrade.engine import predict as P
from spinegrade.engine import studies as S
from spinegrade.errors import UserError
from spinegrade.io.dicom import Volume, read_series
from test_predict import make_classifier_run, make_localizer_run

SPINAL, LEFT_FORAMEN = CONDITIONS[0], CONDITIONS[1]
# Sagittal in LPS: columns run posterior (+y), rows run to the feet (-z).
SAG_IOP = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])


def _sagittal(x_mm: float, n: int = 3) -> Volume:
    """A bare sagittal stack (no pixels) at L-R position ``x_mm``, 0.5 mm pixels."""
    positions = np.array([[x_mm + k - n // 2, 0.0, 0.0] for k in range(n)])
    return Volume(slices=[], instance_numbers=np.arange(1, n + 1), positions=positions,
                  normal_positions=positions[:, 0], orientation=SAG_IOP,
                  normal=np.array([1.0, 0.0, 0.0]), pixel_spacing=np.full((n, 2), 0.5),
                  windows=np.full((n, 2), np.nan), series_instance_uid="", series_description="",
                  transfer_syntax="", path=Path("."))


def _located(condition: str, series_id: str, rows_y: list[float], score: float = 0.5
             ) -> pd.DataFrame:
    return pd.DataFrame({"study_id": "7", "series_id": series_id, "condition": condition,
                         "level_idx": range(5), "level": list(LEVELS), "instance_number": 2,
                         "x": 100.0, "y": rows_y, "score": score})


def test_header_fields_are_read(tmp_path):
    write_series(tmp_path / "knee", n=3, description="T2W_TSE")
    for f in (tmp_path / "knee").iterdir():
        ds = pydicom.dcmread(f)
        ds.BodyPartExamined, ds.StudyDescription, ds.ProtocolName = "KNEE", "MRI KNEE", "T2 TSE"
        ds.save_as(f)
    vol = read_series(tmp_path / "knee", load_pixels=False)
    assert (vol.body_part_examined, vol.study_description, vol.protocol_name) == (
        "KNEE", "MRI KNEE", "T2 TSE")
    assert "knee" in S.header_problem(vol)
    lumbar = _sagittal(0.0)
    lumbar.series_description = "T2 SAG"
    assert S.header_problem(lumbar) is None


def test_a_lumbar_chain_is_kept_and_a_reversed_one_refused():
    vols = {"10": (SAGITTAL_T2, _sagittal(0.0))}
    problems: list = []
    # 70 px = 35 mm per level, head to feet: one lumbar spine.
    good = S.check_locations(_located(SPINAL, "10", [100 + 70 * k for k in range(5)]), vols,
                             0.01, problems, "7")
    assert (good[S.REFUSED] == "").all() and not problems
    bad = S.check_locations(_located(SPINAL, "10", [380 - 70 * k for k in range(5)]), vols,
                            0.01, problems, "7")
    assert bad[S.REFUSED].str.contains("head-to-feet order").all()
    assert [p.kind for p in problems] == [S.IMPLAUSIBLE_DISCS]
    assert set(S.refused_levels(bad, SPINAL)) == set(range(5))
    weak = S.check_locations(_located(SPINAL, "10", [100 + 70 * k for k in range(5)],
                                      score=0.001), vols, 0.01, [], "7")
    assert weak[S.REFUSED].str.contains("enough confidence").all()


def test_canal_and_foramen_disagreeing_at_one_level_refuse_that_level():
    vols = {"10": (SAGITTAL_T2, _sagittal(0.0)), "20": (SAGITTAL_T1, _sagittal(-20.0))}
    y = [100 + 70 * k for k in range(5)]
    moved = list(y)
    # 19 mm lower on Sagittal T1 at L3/L4: more than half way to the next disc, while the
    # foraminal chain alone stays plausible (spacings 35, 54, 16, 35 mm).
    moved[2] += 38
    located = pd.concat([_located(SPINAL, "10", y), _located(LEFT_FORAMEN, "20", moved)])
    problems: list = []
    out = S.check_locations(located, vols, 0.01, problems, "7")
    assert set(S.refused_levels(out, SPINAL)) == {2}
    assert set(S.refused_levels(out, LEFT_FORAMEN)) == {2}
    assert "series disagree" in S.refused_levels(out, SPINAL)[2]
    assert len(problems) == 1 and "l3_l4" in problems[0].message


# --- real DICOM of other anatomy, through predict --------------------------------------------


def _knee_study(root: Path) -> Path:
    """A sagittal knee T2 series as a scanner labels it (BodyPartExamined KNEE, T2W_TSE)."""
    folder = root / "knee" / "301"
    write_series(folder, n=12, shape=(96, 96), spacing=3.0, pixel_spacing=(0.4, 0.4),
                 description="T2W_TSE")
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.BodyPartExamined = "KNEE"
        ds.StudyDescription = "MRI KNEE RIGHT"
        ds.save_as(f)
    return root / "knee"


def _pydicom_study(root: Path, name: str, files: list[str]) -> Path:
    """One study folder holding one series of pydicom's own test files."""
    series = root / name / "1"
    series.mkdir(parents=True)
    for k, f in enumerate(files):
        shutil.copy(f, series / f"{k + 1}.dcm")
    return root / name


def _other_anatomy(root: Path) -> dict[str, Path]:
    ct_head = Path(get_testdata_file("77654033/CT2/17136"))  # CT HEAD "Routine Brain"
    return {
        "knee": _knee_study(root),
        "ct_head": _pydicom_study(root, "ct_head", sorted(str(p) for p in ct_head.parent.iterdir())),
        "mr_small": _pydicom_study(root, "mr_small", [get_testdata_file("MR_small.dcm")]),
        "ct_small": _pydicom_study(root, "ct_small", [get_testdata_file("CT_small.dcm")]),
        "shoulder": _pydicom_study(root, "shoulder", [get_testdata_file("MR2_UNCI.dcm")]),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("anatomy_runs")
    return {"localizer": make_localizer_run(root / "loc"),
            "classifiers": [str(make_classifier_run(root / c[:12], c)) for c in
                            (SPINAL, LEFT_FORAMEN, "left_subarticular_stenosis")]}


@pytest.mark.slow
def test_other_anatomy_is_never_graded_by_the_model(tmp_path, runs, capsys):
    """Every series of these studies is either refused by its header or yields discs that
    are no lumbar spine: every row is 'not graded' for a person, the submission a prior."""
    from spinegrade.cli import main

    cfg = load_config("demo", ["predict.tta=false", "predict.figures=false"])
    for name, study in _other_anatomy(tmp_path / "studies").items():
        try:
            out = P.predict(runs["classifiers"], runs["localizer"], tmp_path / name / "sub.csv",
                            cfg.predict, study_dir=study, progress=False)
        except UserError as e:  # no series of a lumbar type at all: refused outright (exit 2)
            assert "no readable DICOM series" in str(e) and name == "shoulder", (name, e)
            assert not (tmp_path / name / "sub.csv").exists()
            continue
        res = out.results[0]
        assert not [k for k, s in res.source.items() if s == "model"], name
        assert (P.grade_table(res)["grade"] == P.NOT_GRADED).all(), name
        assert len(out.submission) == 25
        np.testing.assert_allclose(out.submission.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-6)
        kinds = {p.kind for p in out.problems}
        if name in ("knee", "ct_head", "shoulder"):
            assert kinds & {S.NOT_LUMBAR_SPINE, "unreadable_series", "unknown_series_type"}, name
    # Without the checks the model grades the knee (taken for Sagittal T2/STIR): the
    # refusals above are what protects it.
    off = load_config("demo", ["predict.tta=false", "predict.figures=false",
                               "predict.check_anatomy=false"])
    graded = P.predict(runs["classifiers"], runs["localizer"], tmp_path / "off" / "sub.csv",
                       off.predict, study_dir=tmp_path / "studies" / "knee", progress=False)
    assert any(s == "model" for s in graded.results[0].source.values())
    problems = pd.read_csv(tmp_path / "knee" / "sub_problems.csv")
    knee = problems[problems["kind"] == S.NOT_LUMBAR_SPINE]
    assert len(knee) == 1 and "BodyPartExamined 'KNEE'" in knee["message"].iloc[0]

    assert main(["predict", "--study", str(tmp_path / "studies" / "knee"), "--localizer",
                 str(runs["localizer"]), *sum((["--classifier", c] for c in runs["classifiers"]),
                                              []),
                 "--out", str(tmp_path / "cli.csv"), "--no-progress",
                 "--set", "predict.tta=false", "--set", "predict.figures=false"]) == 0
    printed = capsys.readouterr().out
    assert P.NOT_GRADED in printed
    assert not any(g in printed for g in ("Normal/Mild", "Moderate", "Severe"))


@pytest.mark.slow
def test_a_lumbar_study_with_plausible_discs_is_graded(tmp_path, runs, synth_dir, monkeypatch):
    """The control: the same checks pass a synthetic lumbar study whose located points are
    its true coordinates, and its spinal and foraminal rows are graded by the model."""
    coords = pd.read_csv(synth_dir / "train_label_coordinates.csv")
    desc = pd.read_csv(synth_dir / "train_series_descriptions.csv")
    study = int(coords["study_id"].iloc[0])

    def truth(localizer, st, volumes, problems):
        rows = coords[coords["study_id"] == study].merge(desc, on=["study_id", "series_id"])
        return pd.DataFrame({
            "study_id": str(study), "series_id": rows["series_id"].astype(str),
            "series_description": rows["series_description"],
            "condition": rows["condition"].map(TITLE_TO_CONDITION),
            "level_idx": rows["level"].map(LEVEL_TITLE_TO_INDEX),
            "level": [LEVELS[LEVEL_TITLE_TO_INDEX[v]] for v in rows["level"]],
            "slice_index": 0, "instance_number": rows["instance_number"],
            "x": rows["x"], "y": rows["y"], "score": 0.9})

    monkeypatch.setattr(P, "locate_levels", truth)
    cfg = load_config("demo", ["predict.tta=false", "predict.figures=false"])
    out = P.predict(runs["classifiers"], runs["localizer"], tmp_path / "sub.csv", cfg.predict,
                    study_dir=synth_dir / "train_images" / str(study), progress=False)
    res = out.results[0]
    for cond in (SPINAL, LEFT_FORAMEN):
        assert [res.source[(cond, lv)] for lv in range(5)] == ["model"] * 5, cond
    assert not [p for p in out.problems if p.kind in (S.IMPLAUSIBLE_DISCS, S.NOT_LUMBAR_SPINE)]
    table = P.grade_table(res)
    assert (table.loc[table["condition"] == SPINAL, "grade"] != P.NOT_GRADED).all()


def test_prior_rows_show_no_grade_but_keep_their_probabilities(tmp_path):
    """An unlocated L1/L2 whose reweighted prior peaks at Severe must not read "Severe"."""
    from spinegrade.report.predict import plot_study

    prior, model = np.array([0.3, 0.3, 0.4]), np.array([0.1, 0.2, 0.7])
    probs = {(c, lv): (model if (c, lv) == (SPINAL, 2) else prior)
             for c in CONDITIONS for lv in range(5)}
    source = {k: ("model" if k == (SPINAL, 2) else "prior: not located") for k in probs}
    res = P.StudyResult("42", probs, source, pd.DataFrame(), {})
    table = P.grade_table(res)
    graded = table[(table["condition"] == SPINAL) & (table["level"] == LEVELS[2])]
    assert graded["grade"].tolist() == ["Severe"] and graded["severe"].tolist() == [0.7]
    others = table.drop(graded.index)
    assert (others["grade"] == P.NOT_GRADED).all() and (others["severe"] == "").all()
    sub = pd.DataFrame(P.submission_rows(res)).set_index("row_id")
    np.testing.assert_allclose(sub.loc[f"42_{SPINAL}_l1_l2"].to_numpy(), prior)
    assert plot_study(res, tmp_path / "fig.png").is_file()
