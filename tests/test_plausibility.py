"""Anatomical plausibility: header evidence, the disc chain and cross-series agreement."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from spinegrade.constants import SERIES_DESCRIPTIONS
from spinegrade.data import plausibility as P

# --- Header rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("description,body_part", [
    ("Sagittal T1", "LSPINE"), ("Sagittal T2/STIR", None), ("Axial T2", ""),
    ("SAG T2 FSE", "L SPINE"), ("t2_tse_sag", "L-SPINE"), ("AX T2 L3-S1", "SPINE"),
    ("Sag T1 FLAIR", "LUMBAR"),  # GE's sagittal T1 FLAIR is a standard lumbar sequence
    ("T2W_TSE", "LSSPINE"), ("", "LWS"), ("AX T2 FRFSE", "TLSPINE"),
    ("Sag T2", "PELVIS"),  # unfamiliar but not clearly other anatomy: the images decide
    ("localizer", "WHOLEBODY"),
    ("knee T2 for comparison, LSPINE study", "KNEE"),  # lumbar evidence in any field wins
])
def test_header_accepts_lumbar_and_unclear(description, body_part):
    assert P.lumbar_header_problem(description, body_part) is None


@pytest.mark.parametrize("description,body_part,word", [
    ("T2W_TSE", "KNEE", "knee"),  # the sagittal knee
    ("AX FLAIR", "BRAIN", "brain"), ("t2_tse_tra", "HEAD", "head"),
    ("Sag T2", "CSPINE", "cspine"), ("SAG T2 C-SPINE", None, "cspine"),
    ("Axial T2 cervical", "SPINE", "cervical"),  # generic spine, description says cervical
    ("PD FS COR", "SHOULDER", "shoulder"), ("AX T1", "CHEST", "chest"),
    ("Knee PD SAG", None, "knee"), ("T2 BRAIN AX", "", "brain"),
    ("t1_vibe_fs_tra_bh_dyn", "ABDOMEN", "abdomen"), ("Sag STIR", "ANKLE", "ankle"),
])
def test_header_refuses_clear_other_anatomy(description, body_part, word):
    reason = P.lumbar_header_problem(description, body_part)
    assert reason is not None and word in reason and "not a lumbar spine" in reason


def test_header_uses_study_description_and_protocol():
    assert "shoulder" in P.lumbar_header_problem("", None, study_description="SHOULDER")
    assert "brain" in P.lumbar_header_problem("", None, protocol_name="T2 FLAIR BRAIN")
    assert P.lumbar_header_problem("", None, study_description="MRI L-SPINE W/O") is None


def test_header_does_not_match_inside_words():
    # "hip" in "ship", "hand" in "handled", "head" in "ahead": words only.
    assert P.lumbar_header_problem("ship handled ahead", None) is None
    assert P.lumbar_header_problem("FL3D_SAG", None) is None


def _header(name: str) -> dict:
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    return {k: (str(ds.get(k)) if ds.get(k) is not None else None)
            for k in ("SeriesDescription", "BodyPartExamined", "StudyDescription", "ProtocolName")}


# What pydicom's and pydicom-data's MR test files say (read with pydicom 3.0.2 /
# pydicom-data 1.0.0):
#   emri_small.dcm                    BodyPartExamined HEAD, descriptions empty
#   MR2_J2KI.dcm, MR2_UNCI.dcm        no BodyPartExamined / SeriesDescription;
#                                     StudyDescription SHOULDER, ProtocolName T1W/SE/1024
#   MR-SIEMENS-DICOM-WithOverlays.dcm BodyPartExamined ABDOMEN, StudyDescription abdomen^liver
#   MR_small.dcm                      no anatomy in any field: the header cannot refuse it,
#                                     the disc-chain rule on its located points must.
REAL_OTHER_ANATOMY = {"emri_small.dcm": "head", "MR2_J2KI.dcm": "shoulder",
                      "MR2_UNCI.dcm": "shoulder", "MR-SIEMENS-DICOM-WithOverlays.dcm": "abdomen"}


@pytest.mark.parametrize("name,word", sorted(REAL_OTHER_ANATOMY.items()))
def test_real_non_spine_dicom_is_refused_by_header(name, word):
    h = _header(name)
    reason = P.lumbar_header_problem(h["SeriesDescription"] or "", h["BodyPartExamined"],
                                     study_description=h["StudyDescription"],
                                     protocol_name=h["ProtocolName"])
    assert reason is not None and word in reason


def test_real_dicom_without_anatomy_passes_header():
    h = _header("MR_small.dcm")
    assert all(v is None for v in h.values())
    assert P.lumbar_header_problem("", None) is None


def test_synthetic_rsna_series_pass_header(synth_dir):
    seen = set()
    for path in sorted((synth_dir / "train_images").glob("*/*/*.dcm"))[::25]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        seen.add(str(ds.SeriesDescription))
        assert P.lumbar_header_problem(str(ds.SeriesDescription),
                                       str(ds.get("BodyPartExamined", ""))) is None
    assert seen == set(SERIES_DESCRIPTIONS)


# --- Disc chain rule ------------------------------------------------------------------------


def _chain(spacing=36.0, bend_deg=8.0, start=(0.0, 20.0, 80.0)) -> np.ndarray:
    """Five discs going down (-z), each segment turning ``bend_deg`` towards anterior (-y)."""
    pts = [np.asarray(start, float)]
    for k in range(4):
        a = math.radians(bend_deg * k)
        pts.append(pts[-1] + spacing * np.array([0.0, -math.sin(a), -math.cos(a)]))
    return np.stack(pts)


CONF = np.full(5, 0.9)


def test_chain_plausible_spine_passes():
    assert P.disc_chain_problem(_chain(), CONF, 0.5) is None
    assert P.disc_chain_problem(_chain(spacing=25.0, bend_deg=15.0), CONF, 0.5) is None
    # A missing level (NaN) is skipped; its neighbours count as two spacings.
    pts = _chain()
    pts[2] = np.nan
    assert P.disc_chain_problem(pts, np.array([0.9, 0.9, np.nan, 0.9, 0.9]), 0.5) is None


@pytest.mark.parametrize("spacing,ok", [(15.5, True), (14.5, False), (59.5, True), (60.5, False)])
def test_chain_spacing_bounds(spacing, ok):
    reason = P.disc_chain_problem(_chain(spacing=spacing, bend_deg=0.0), CONF, 0.5)
    assert (reason is None) == ok
    if not ok:
        assert "lumbar range" in reason


def test_chain_skipped_level_and_double_point_are_caught():
    pts = _chain()
    # Two predicted points on one disc: 5 mm apart.
    twice = pts.copy()
    twice[1] = twice[0] + [0.0, 0.0, -5.0]
    assert "lumbar range" in P.disc_chain_problem(twice, CONF, 0.5)
    # Every point one level lower and the last one two: 72 mm for one level.
    skipped = pts.copy()
    skipped[4] = skipped[3] + (skipped[3] - skipped[2]) * 2
    assert "72.0 mm" in P.disc_chain_problem(skipped, CONF, 0.5)


def test_chain_order_head_to_feet():
    reversed_chain = _chain()[::-1]
    assert "head-to-feet order" in P.disc_chain_problem(reversed_chain, CONF, 0.5)
    swapped = _chain()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert "L2/L3 is not below L1/L2" in P.disc_chain_problem(swapped, CONF, 0.5)
    # Running mostly front to back (a chain lying across the body) is no spine either.
    flat = np.array([[0.0, 80.0 - 36 * k, 50.0 - 10 * k] for k in range(5)])
    assert "off the head-to-feet axis" in P.disc_chain_problem(flat, CONF, 0.5)


@pytest.mark.parametrize("bend,ok", [(20.0, True), (44.0, True), (46.0, False)])
def test_chain_kink_bound(bend, ok):
    # One kink of ``bend`` degrees at L3/L4, otherwise straight; the segments stay well
    # within 60 degrees of the S-I axis (the kink splits both ways).
    half = math.radians(bend / 2)
    up = np.array([0.0, -math.sin(half), -math.cos(half)])
    down = np.array([0.0, math.sin(half), -math.cos(half)])
    pts = np.stack([np.zeros(3), 35 * up, 70 * up, 70 * up + 35 * down, 70 * up + 70 * down])
    reason = P.disc_chain_problem(pts, CONF, 0.5)
    assert (reason is None) == ok
    if not ok:
        assert "bends 46 deg at L3/L4" in reason


def test_chain_confidence():
    pts = _chain()
    reason = P.disc_chain_problem(pts, np.array([0.9, 0.1, 0.1, 0.1, 0.9]), 0.5)
    assert "only 2 of 5" in reason and "L2/L3" in reason
    # Three confident levels suffice; the weak ones are left out of the geometry.
    assert P.disc_chain_problem(pts, np.array([0.9, 0.1, 0.9, 0.1, 0.9]), 0.5) is None
    # The knee: five scattered points with peak scores 0.005-0.085.
    rng = np.random.default_rng(0)
    knee = rng.uniform(-60, 60, (5, 3))
    knee_conf = np.array([0.005, 0.02, 0.085, 0.04, 0.01])
    assert "only 0 of 5" in P.disc_chain_problem(knee, knee_conf, 0.3)


def test_scattered_points_fail_even_when_confident():
    rng = np.random.default_rng(1)
    refused = sum(P.disc_chain_problem(rng.uniform(-80, 80, (5, 3)), CONF, 0.5) is not None
                  for _ in range(200))
    assert refused == 200


# --- Cross-series rule ----------------------------------------------------------------------


def test_cross_series_agreement():
    t2 = _chain()
    t1 = t2 + [1.5, -2.0, 1.0]  # 2.7 mm apart at every level
    assert P.cross_series_problem(t2, t1, 10.0) is None
    off = t1.copy()
    off[3] += [0.0, 0.0, -12.0]  # L4/L5 12.x mm away
    reason = P.cross_series_problem(t2, off, 10.0)
    assert "L4/L5" in reason and "L1/L2" not in reason
    # Shifted by one whole level (T1 labelled one disc lower): every shared level disagrees.
    shifted = np.concatenate([t2[1:], [t2[4] + (t2[4] - t2[3])]])
    assert P.cross_series_problem(t2, shifted, 10.0).count("36.0 mm") == 5
    # Levels located in only one series are not compared.
    partial = off.copy()
    partial[3] = np.nan
    assert P.cross_series_problem(t2, partial, 10.0) is None
    # Foramina 20 mm left of the canal: fine when the lateral axis is ignored.
    lateral = t2 + [20.0, 0.0, 0.0]
    assert P.cross_series_problem(t2, lateral, 10.0) is not None
    assert P.cross_series_problem(t2, lateral, 10.0, ignore_lateral=True) is None


def _labelled_points(root, study: int, description: str, conditions) -> np.ndarray | None:
    """(5, 3) patient points of the labels of ``conditions`` (mean over them) on one series."""
    import pandas as pd

    from spinegrade.constants import LEVEL_TITLES
    from spinegrade.io import dicom
    from spinegrade.io.geometry import pixel_to_patient

    series = pd.read_csv(root / "train_series_descriptions.csv")
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    row = series[(series.study_id == study) & (series.series_description == description)]
    if row.empty:
        return None
    sid = int(row.series_id.iloc[0])
    vol = dicom.read_series(root / "train_images" / str(study) / str(sid), load_pixels=False)
    out = np.full((5, 3), np.nan)
    for i, level in enumerate(LEVEL_TITLES):
        picked = coords[(coords.series_id == sid) & coords.condition.isin(conditions)
                        & (coords.level == level)]
        found = [pixel_to_patient(vol.positions[vol.index_of(r.instance_number)], vol.orientation,
                                  vol.pixel_spacing[vol.index_of(r.instance_number)], r.x, r.y)
                 for r in picked.itertuples()]
        if found:
            out[i] = np.mean(found, axis=0)
    return out


def test_synthetic_studies_are_plausible(synth_dir):
    """The true disc positions of every synthetic study pass all three rules."""
    import pandas as pd

    studies = pd.read_csv(synth_dir / "train.csv").study_id.tolist()
    foramina = ("Left Neural Foraminal Narrowing", "Right Neural Foraminal Narrowing")
    compared = 0
    for study in studies:
        t2 = _labelled_points(synth_dir, study, SERIES_DESCRIPTIONS[1], ("Spinal Canal Stenosis",))
        t1 = _labelled_points(synth_dir, study, SERIES_DESCRIPTIONS[0], foramina)
        left = _labelled_points(synth_dir, study, SERIES_DESCRIPTIONS[0], foramina[:1])
        for pts in (t2, t1):
            if pts is not None:
                assert P.disc_chain_problem(pts, np.ones(5), 0.5) is None, study
        if t1 is not None and t2 is not None:
            assert P.cross_series_problem(t2, t1, 10.0) is None, study
            assert P.cross_series_problem(t2, left, 10.0, ignore_lateral=True) is None, study
            compared += 1
    assert compared >= 10
