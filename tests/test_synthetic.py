"""The synthetic RSNA-format generator: formats, DICOM geometry from headers, labels, balance.

Geometry and label checks read only the written files (CSV + DICOM headers/pixels), never
the generator's internals, so they also describe what downstream code may rely on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spinegrade.constants import (
    CLASS_BALANCE,
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    COORD_COLUMNS,
    LEVEL_TITLES,
    SERIES_COLUMNS,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
    SOLUTION_WEIGHT_COLUMN,
    SUBMISSION_COLUMNS,
    TRAIN_COLUMNS,
)
from spinegrade.data.synthetic import SynthOptions, generate
from spinegrade.errors import UserError

SAG_T1, SAG_T2, AXIAL = SERIES_DESCRIPTIONS
SMALL = SynthOptions(max_matrix=160, p_missing_series=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_small")
    generate(out, n_studies=5, seed=3, n_test=2, progress=False, options=SMALL)
    return out


@pytest.fixture(scope="module")
def headers(data) -> dict[tuple[int, int], dict[int, pydicom.Dataset]]:
    """(study, series) -> instance -> header, for the training images."""
    out: dict = {}
    for f in sorted((data / "train_images").glob("*/*/*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.setdefault((int(f.parts[-3]), int(f.parts[-2])), {})[int(f.stem)] = ds
    return out


def _plane(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    iop = np.array(ds.ImageOrientationPatient, float)
    return (np.array(ds.ImagePositionPatient, float), iop[:3], iop[3:],
            np.cross(iop[:3], iop[3:]))


def _to_patient(ds: pydicom.Dataset, x: float, y: float) -> np.ndarray:
    """Patient position of pixel (column x, row y) from the header alone."""
    ipp, row, col, _ = _plane(ds)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return ipp + x * dc * row + y * dr * col


def _labels(data: Path) -> pd.DataFrame:
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    series = pd.read_csv(data / "train_series_descriptions.csv")
    return coords.merge(series, on=["study_id", "series_id"])


def _points(data: Path, headers) -> pd.DataFrame:
    """Label rows plus their patient position ``p`` (x, y, z arrays)."""
    lab = _labels(data)
    lab["p"] = [
        _to_patient(headers[(r.study_id, r.series_id)][r.instance_number], r.x, r.y)
        for r in lab.itertuples()
    ]
    return lab


def test_csv_columns_and_vocabularies(data):
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    assert tuple(train.columns) == TRAIN_COLUMNS
    assert set(train.iloc[:, 1:].to_numpy().ravel()) <= {*SEVERITIES, ""}
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    assert tuple(coords.columns) == COORD_COLUMNS
    assert set(coords.condition) <= set(CONDITION_TITLES.values())
    assert set(coords.level) <= set(LEVEL_TITLES)
    for name in ("train_series_descriptions.csv", "test_series_descriptions.csv"):
        s = pd.read_csv(data / name)
        assert tuple(s.columns) == SERIES_COLUMNS
        assert set(s.series_description) <= set(SERIES_DESCRIPTIONS)
    test_ids = set(pd.read_csv(data / "test_series_descriptions.csv").study_id)
    assert len(test_ids) == 2 and not test_ids & set(train.study_id.astype(int))
    sub = pd.read_csv(data / "sample_submission.csv")
    assert tuple(sub.columns) == SUBMISSION_COLUMNS and len(sub) == 2 * 25
    sol = pd.read_csv(data / "solution.csv")
    assert tuple(sol.columns) == (*SUBMISSION_COLUMNS, SOLUTION_WEIGHT_COLUMN)
    assert set(sol.row_id) <= set(sub.row_id)
    onehot = sol[list(SUBMISSION_COLUMNS[1:])].to_numpy()
    assert (onehot.sum(axis=1) == 1).all()
    assert np.array_equal(sol[SOLUTION_WEIGHT_COLUMN], np.array([1, 2, 4])[onehot.argmax(1)])


def test_every_label_has_its_series_and_a_grade(data):
    lab = _labels(data)
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    for r in lab.itertuples():
        cond = {v: k for k, v in CONDITION_TITLES.items()}[r.condition]
        assert r.series_description == CONDITION_SERIES[cond]
        column = f"{cond}_{r.level.lower().replace('/', '_')}"
        assert train.set_index("study_id").loc[str(r.study_id), column] in SEVERITIES


def test_dicom_files_are_valid_mr(data, headers):
    f = next((data / "train_images").glob("*/*/*.dcm"))
    ds = pydicom.dcmread(f)
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.MRImageStorage
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
    assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 0)
    assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == (ds.Rows, ds.Columns)
    for (study, series), instances in headers.items():
        for inst, h in instances.items():
            assert (h.StudyInstanceUID, h.SeriesInstanceUID) == (str(study), str(series))
            assert h.InstanceNumber == inst >= 1


def test_coordinates_inside_their_image(data, headers):
    for r in _labels(data).itertuples():
        h = headers[(r.study_id, r.series_id)][r.instance_number]
        assert 0 <= r.x < h.Columns and 0 <= r.y < h.Rows


def test_slice_positions_follow_declared_order(data, headers):
    manifest = json.loads((data / "synthetic.json").read_text())["series"]
    for (_, series), instances in headers.items():
        stacks: dict[tuple, list] = {}
        for _, h in sorted(instances.items()):
            ipp, *_, normal = _plane(h)
            key = tuple(np.round(h.ImageOrientationPatient, 4))
            stacks.setdefault(key, []).append(float(ipp @ normal))
        order = manifest[str(series)]["order"]
        for proj in stacks.values():
            steps = np.diff(np.sort(proj))
            assert np.allclose(steps, steps[0], atol=1e-3) and steps[0] > 1.0
            if order == "ascending":
                assert (np.diff(proj) > 0).all()
            elif order == "descending":
                assert (np.diff(proj) < 0).all()


def test_label_points_on_the_right_slices(data, headers):
    pts = _points(data, headers)
    for study, g in pts.groupby("study_id"):
        by = {(r.condition, r.level): r for r in g.itertuples()}
        t2 = headers[(study, g[g.series_description == SAG_T2].series_id.iloc[0])]
        t1 = headers[(study, g[g.series_description == SAG_T1].series_id.iloc[0])]
        t1_step = np.diff(sorted(_plane(h)[0] @ _plane(h)[3] for h in t1.values())).min()
        ax_id = g[g.series_description == AXIAL].series_id.iloc[0]
        spinal_z = []
        for level in LEVEL_TITLES:
            sp = by[(CONDITION_TITLES[CONDITIONS[0]], level)]
            left, right = (by[(CONDITION_TITLES[c], level)] for c in CONDITIONS[1:3])
            # LPS: patient left is +x.
            assert left.p[0] > right.p[0] + 20
            mid = (left.p + right.p) / 2
            dist = {i: abs((mid - _plane(h)[0]) @ _plane(h)[3]) for i, h in t2.items()}
            # The foraminal points lie on their own T1 slices, so the midline estimate is
            # good to half a T1 step.
            assert dist[sp.instance_number] <= min(dist.values()) + t1_step / 2 + 0.5
            spinal_z.append(sp.p[2])
            for c in CONDITIONS[3:]:
                sub = by.get((CONDITION_TITLES[c], level))
                if sub is None:
                    continue  # an empty label cell
                axial = headers[(study, ax_id)]
                d = {i: abs((sp.p - _plane(h)[0]) @ _plane(h)[3]) for i, h in axial.items()}
                assert d[sub.instance_number] <= min(d.values()) + 1.0
        assert (np.diff(spinal_z) < -20).all(), "levels must run superior to inferior"


def _pixels(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(float) * float(getattr(ds, "RescaleSlope", 1.0))
    return img.max() - img if ds.PhotometricInterpretation == "MONOCHROME1" else img


def test_spinal_point_sits_in_bright_csf_unless_severe(data):
    lab = _labels(data)
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False).set_index("study_id")
    spinal = lab[lab.condition == CONDITION_TITLES[CONDITIONS[0]]]
    normal, severe = [], []
    for r in spinal.itertuples():
        img = _pixels(data / "train_images" / str(r.study_id) / str(r.series_id) / f"{r.instance_number}.dcm")
        x, y = int(round(r.x)), int(round(r.y))
        value = img[y - 1: y + 2, x - 1: x + 2].mean() / np.percentile(img, 99.5)
        grade = train.loc[str(r.study_id), f"{CONDITIONS[0]}_{r.level.lower().replace('/', '_')}"]
        (normal if grade == SEVERITIES[0] else severe if grade == SEVERITIES[2] else []).append(value)
    assert min(normal) > 0.6, "CSF at the disc level of a Normal/Mild canal is bright on T2"
    assert not severe or max(severe) < min(normal)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    opts = SynthOptions(max_matrix=64)
    for name in ("a", "b"):
        generate(tmp_path / name, n_studies=2, seed=11, n_test=1, progress=False, options=opts)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len(a) > 50


def test_class_balance_default_and_override(tmp_path):
    opts = SynthOptions(labels_only=True)
    s = generate(tmp_path / "d", n_studies=300, seed=1, n_test=0, progress=False, options=opts)
    assert s.n_images == 0
    for cond in CONDITIONS:
        freq = np.array(s.grade_counts[cond]) / sum(s.grade_counts[cond])
        assert np.abs(freq - CLASS_BALANCE[cond]).max() < 0.04, cond
    s = generate(tmp_path / "o", n_studies=200, seed=1, n_test=0, progress=False, options=opts,
                 class_balance={CONDITIONS[0]: (1, 1, 2)})
    freq = np.array(s.grade_counts[CONDITIONS[0]]) / sum(s.grade_counts[CONDITIONS[0]])
    assert np.abs(freq - [0.25, 0.25, 0.5]).max() < 0.05


def test_bad_requests_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        generate(tmp_path / "x", n_studies=0, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        generate(tmp_path / "full", n_studies=1, progress=False)
    with pytest.raises(UserError, match="unknown condition"):
        generate(tmp_path / "y", n_studies=1, progress=False, class_balance={"spine": (1, 1, 1)})


def test_cli_help_and_labels_only_run(tmp_path, capsys):
    from spinegrade.cli import main

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = capsys.readouterr().out
    for option in ("--studies", "--test-studies", "--seed", "--balance", "--workers",
                   "--max-matrix", "--labels-only", "--overwrite", "--preview", "--no-progress"):
        assert option in text
    args = ["synth", str(tmp_path / "o"), "--studies", "3", "--labels-only", "--no-progress",
            "--balance", "0.2,0.3,0.5"]
    assert main(args) == 0
    assert main(args) == 2  # non-empty OUT without --overwrite
    assert main([*args, "--overwrite"]) == 0
    assert "not empty" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "z"), "--studies", "0"]) == 2


def test_difficulty_levels_overlap_and_reader_noise():
    from spinegrade import choices
    from spinegrade.data.synthetic import DIFFICULTIES, GRADE_RANGES
    from spinegrade.data.synthetic import labels as L

    assert tuple(DIFFICULTIES) == choices.SYNTH_DIFFICULTIES
    assert DIFFICULTIES["easy"].grade_ranges == GRADE_RANGES == (
        (0.0, 0.34), (0.30, 0.62), (0.58, 0.95))   # the demo's data, as before
    overlap = {name: d.grade_ranges[0][1] - d.grade_ranges[1][0] for name, d in DIFFICULTIES.items()}
    assert overlap["easy"] < overlap["realistic"] < overlap["hard"]
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 3, (200, 50))
    for name, rate in (("easy", 0.0), ("realistic", 0.10), ("hard", 0.20)):
        d = DIFFICULTIES[name]
        assert d.label_noise == rate
        latent = L.sample_latent(rng, grades, d.grade_ranges)
        read = L.reader_labels(np.random.default_rng(1), grades, latent, d)
        changed = read != grades
        assert abs(changed.mean() - rate) < 0.01, name          # 10,000 cells
        assert (np.abs(read - grades) <= 1).all()                # only to a neighbour
        assert ((read >= 0) & (read <= 2)).all()
        # Moderate moves towards the side its latent narrowing is nearer.
        lo, hi = d.grade_ranges[1]
        moved = changed & (grades == 1)
        assert (read[moved & (latent < (lo + hi) / 2)] == 0).all()
        assert (read[moved & (latent >= (lo + hi) / 2)] == 2).all()


def test_hard_dataset_records_its_noise_and_easy_draws_no_noise(tmp_path):
    opts = dict(labels_only=True)
    easy = generate(tmp_path / "e", n_studies=80, seed=2, n_test=0, progress=False,
                    options=SynthOptions(**opts))
    hard = generate(tmp_path / "h", n_studies=80, seed=2, n_test=0, progress=False,
                    options=SynthOptions(**opts, difficulty="hard"))
    me = json.loads((tmp_path / "e" / "synthetic.json").read_text())["difficulty"]
    mh = json.loads((tmp_path / "h" / "synthetic.json").read_text())["difficulty"]
    assert me["relabelled_cells"] == 0 and me["label_noise"] == 0.0
    assert abs(mh["relabelled_cells"] / mh["labelled_cells"] - 0.20) < 0.03
    # Same seed: same studies and series, only the labels differ.
    assert easy.train_ids == hard.train_ids
    assert (tmp_path / "e" / "train.csv").read_text() != (tmp_path / "h" / "train.csv").read_text()
    with pytest.raises(UserError, match="difficulty"):
        generate(tmp_path / "x", n_studies=1, progress=False,
                 options=SynthOptions(difficulty="brutal"))
