"""Sagittal -> axial mapping in patient coordinates, against positions computed by hand.

Expected slices and pixels are written out with explicit trigonometry (components of the
tilted directions), never with the functions under test.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spinegrade.constants import LEVEL_TITLES, SERIES_DESCRIPTIONS
from spinegrade.io import dicom
from spinegrade.io import geometry as G

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to the patient's left, columns posterior
THETA = math.radians(15.0)
S, C = math.sin(THETA), math.cos(THETA)
# Tilted 15 degrees about the L-R axis: row (1, 0, 0), column (0, cos, sin), so the normal
# row x column is (0, -sin, cos).
TILTED = (1.0, 0.0, 0.0, 0.0, C, S)


def _stack(origin, gap, n, iop, spacing, shape=(256, 256), instances=None) -> G.StackGeometry:
    """n parallel slices whose first pixels step ``gap`` mm along the normal of ``iop``."""
    normal = np.array([0.0, -iop[5], iop[4]])  # row (1, 0, 0) x column (0, c, s), by hand
    pos = np.asarray(origin, float) + np.arange(n)[:, None] * gap * normal
    return G.StackGeometry.build(pos, iop, spacing, shape,
                                 np.arange(1, n + 1) if instances is None else instances)


def _expected_tilted(p, origin, gap, n, spacing):
    """Nearest slice, signed distance and pixel of p in a stack tilted by THETA, by hand."""
    dx, dy, dz = (p[i] - origin[i] for i in range(3))
    along = -dy * S + dz * C  # distance from slice 0's plane along the normal
    k = min(max(round(along / gap), 0), n - 1)
    x = dx / spacing[1]
    y = (dy * C + dz * S) / spacing[0]  # the normal step adds nothing along the column
    return k, along - k * gap, x, y


def test_pixel_to_patient_and_back_by_hand():
    p = G.pixel_to_patient((-100.0, -120.0, 7.0), AXIAL, (0.8, 0.7), 10.0, 20.0)
    np.testing.assert_allclose(p, [-100 + 10 * 0.7, -120 + 20 * 0.8, 7.0])
    # Tilted plane: column direction (0, cos, sin).
    q = G.pixel_to_patient((1.0, 2.0, 3.0), TILTED, (0.5, 0.25), 4.0, 8.0)
    np.testing.assert_allclose(q, [1 + 4 * 0.25, 2 + 8 * 0.5 * C, 3 + 8 * 0.5 * S])
    x, y, d = G.patient_to_pixel(q + 2.0 * np.array([0.0, -S, C]), (1.0, 2.0, 3.0), TILTED,
                                 (0.5, 0.25))
    assert (x, y, d) == pytest.approx((4.0, 8.0, 2.0))
    grid = G.pixel_to_patient((0.0, 0.0, 0.0), AXIAL, (1.0, 2.0), np.arange(3), np.zeros(3))
    np.testing.assert_allclose(grid, [[0, 0, 0], [2, 0, 0], [4, 0, 0]])


def test_plain_axial_stack():
    # 20 slices at z = -50, -46, ..., 26; instance numbers run feet-to-head reversed.
    stack = _stack((-100.0, -120.0, -50.0), 4.0, 20, AXIAL, (0.8, 0.7),
                   instances=np.arange(20, 0, -1))
    m = G.nearest_slice(np.array([-60.1, -80.2, 13.3]), stack)
    # (13.3 + 50) / 4 = 15.8 -> slice 16 at z = 14: 0.7 mm below it.
    assert (m.slice_index, m.instance_number) == (16, 4)
    assert m.distance_mm == pytest.approx(-0.7)
    assert (m.x, m.y) == pytest.approx(((-60.1 + 100) / 0.7, (-80.2 + 120) / 0.8))
    assert m.inside


def test_oblique_stack_tilted_15_degrees():
    origin, gap, n, sp = (-90.0, -100.0, -30.0), 4.5, 12, (0.75, 0.6)
    stack = _stack(origin, gap, n, TILTED, sp)
    # A point built from a chosen answer: slice 7, pixel (120.25, 88.5), 1.1 mm below it.
    k, xs, ys, off = 7, 120.25, 88.5, -1.1
    p = np.array([
        origin[0] + xs * sp[1],
        origin[1] + k * gap * -S + ys * sp[0] * C + off * -S,
        origin[2] + k * gap * C + ys * sp[0] * S + off * C,
    ])
    m = G.nearest_slice(p, stack)
    assert m.slice_index == k
    assert (m.distance_mm, m.x, m.y) == pytest.approx((off, xs, ys))
    # The slice whose first pixel is nearest in z would be wrong: the tilt matters.
    naive = int(np.argmin(np.abs(stack.positions[:, 2] - p[2])))
    assert naive != k
    # A point given in raw coordinates, expected slice and pixel by explicit trigonometry.
    q = np.array([0.0, 0.0, 0.0])
    k2, d2, x2, y2 = _expected_tilted(q, origin, gap, n, sp)
    m2 = G.nearest_slice(q, stack)
    assert (k2, round(d2, 2), round(x2, 2), round(y2, 2)) == (1, -1.4, 150.0, 139.14)
    assert m2.slice_index == k2
    assert (m2.distance_mm, m2.x, m2.y) == pytest.approx((d2, x2, y2))


def test_non_parallel_blocks_use_each_slice_plane():
    """One 'stack' of two blocks (straight at the top, tilted below), as per-disc axials."""
    upper = _stack((-100.0, -80.0, 40.0), 4.0, 5, AXIAL, (0.8, 0.8))
    lower = _stack((-100.0, -80.0, -20.0), 3.0, 5, TILTED, (0.8, 0.8))
    both = G.StackGeometry.build(np.concatenate([upper.positions, lower.positions]),
                                 np.concatenate([upper.orientations, lower.orientations]),
                                 (0.8, 0.8), (256, 256), np.arange(1, 11))
    np.testing.assert_allclose(both.gaps(), [4.0] * 5 + [3.0] * 5)
    p = np.array([5.0, 10.0, 10.0])
    k, d, x, y = _expected_tilted(p, (-100.0, -80.0, -20.0), 3.0, 5, (0.8, 0.8))
    assert k == 2  # along = -90 sin + 30 cos = 5.69 mm: slice 2 of the lower block
    m = G.nearest_slice(p, both)
    assert m.slice_index == 5 + k and m.instance_number == 6 + k
    assert (m.distance_mm, m.x, m.y) == pytest.approx((d, x, y))
    assert abs(d) <= 1.5  # within half a gap of the chosen plane
    # The same point against the upper block alone is far away (z 40 is its lowest plane).
    assert G.nearest_slice(p, upper).distance_mm == pytest.approx(-30.0)


# Five discs, head to feet (LPS: z decreases), and two axial stacks: an upper straight one
# (z 20 .. 108) and a lower one tilted 15 degrees; both can see L3/L4.
DISCS = np.array([[0.0, 10.0, 101.3], [0.0, 12.0, 63.1], [0.0, 15.0, 29.0],
                  [0.0, 20.0, -6.0], [0.0, 30.0, -40.0]])
UPPER = dict(origin=(-100.0, -80.0, 20.0), gap=4.0, n=23)
LOWER = dict(origin=(-100.0, -80.0, -80.0), gap=4.0, n=25)
SP = (0.78125, 0.78125)  # 200 mm over 256 pixels


def _two_stacks() -> list[G.StackGeometry]:
    return [_stack(UPPER["origin"], UPPER["gap"], UPPER["n"], AXIAL, SP),
            _stack(LOWER["origin"], LOWER["gap"], LOWER["n"], TILTED, SP)]


def test_study_with_two_axial_stacks():
    found = G.locate_points(DISCS, _two_stacks())
    # Upper stack, by hand: slice k at z = 20 + 4k.
    upper_expect = {0: (20, 1.3), 1: (11, -0.9), 2: (2, 1.0)}
    lower_expect = {i: _expected_tilted(DISCS[i], LOWER["origin"], 4.0, 25, SP) for i in (2, 3, 4)}
    # L3/L4 is seen by both: the nearer plane wins (explicit comparison of the hand values).
    l34_lower = abs(lower_expect[2][1]) < upper_expect[2][1]
    assert l34_lower  # 0.70 mm in the lower stack against 1.0 mm in the upper one
    for i, (match, reason) in enumerate(found):
        assert reason is None and match is not None, LEVEL_TITLES[i]
        if i < 2:
            k, d = upper_expect[i]
            x = (DISCS[i][0] + 100) / SP[1]
            y = (DISCS[i][1] + 80) / SP[0]
            assert (match.stack, match.slice_index) == (0, k)
            assert (match.distance_mm, match.x, match.y) == pytest.approx((d, x, y))
        else:
            k, d, x, y = lower_expect[i]
            assert (match.stack, match.slice_index) == (1, k)
            assert (match.distance_mm, match.x, match.y) == pytest.approx((d, x, y))
    # One value written out: L4/L5 in the lower stack, along = -100 sin + 74 cos = 45.60.
    assert found[3][0].slice_index == 11
    assert found[3][0].distance_mm == pytest.approx(-100 * S + 74 * C - 44.0)


def test_points_no_stack_covers():
    stacks = _two_stacks()
    match, reason = G.locate_point(np.array([0.0, 10.0, 300.0]), stacks)
    assert match is None and "mm away" in reason and "tolerance" in reason
    match, reason = G.locate_point(np.array([500.0, 10.0, 60.0]), stacks)
    assert match is None and "field of view" in reason
    match, reason = G.locate_point(np.array([np.nan, np.nan, np.nan]), stacks)
    assert match is None and "no 3D position" in reason
    assert G.locate_point(DISCS[0], [])[1] == "no axial stack"


def test_distance_tolerance_is_one_and_a_half_gaps():
    stack = [_stack(UPPER["origin"], 4.0, UPPER["n"], AXIAL, SP)]
    top = UPPER["origin"][2] + 4.0 * (UPPER["n"] - 1)  # z of the highest plane
    inside, _ = G.locate_point(np.array([0.0, 0.0, top + 5.9]), stack)
    assert inside is not None and inside.slice_index == UPPER["n"] - 1
    outside, reason = G.locate_point(np.array([0.0, 0.0, top + 6.1]), stack)
    assert outside is None and "6.0 mm tolerance" in reason
    fixed, _ = G.locate_point(np.array([0.0, 0.0, top + 6.1]), stack, max_distance_mm=10.0)
    assert fixed is not None


def test_single_slice_stack_uses_fallback_gap():
    one = G.StackGeometry.build(np.array([[-100.0, -80.0, 0.0]]), AXIAL, SP, (256, 256))
    np.testing.assert_allclose(one.gaps(), [G.FALLBACK_SLICE_GAP_MM])
    assert G.locate_point(np.array([0.0, 0.0, 5.9]), [one])[0] is not None
    assert G.locate_point(np.array([0.0, 0.0, 6.1]), [one])[0] is None


# --- End to end on the synthetic generator ------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from spinegrade.data.synthetic import SynthOptions, generate

    out = tmp_path_factory.mktemp("mapping")
    # Seed 0 gives both axial kinds: per-disc tilted blocks (2 studies) and one long stack.
    summary = generate(out, 3, seed=0, n_test=0, progress=False, options=SynthOptions(
        max_matrix=96, p_missing_series=0.0, empty_scale=0.0, p_axial_per_level=0.5))
    return out, summary


def _per_slice_orientations(volume: dicom.Volume) -> np.ndarray:
    """(n, 6) IOP of each slice, read from its header (Volume keeps only the common one)."""
    return np.stack([dicom.read_header(f)[0].orientation for f in volume.files])


def _split_blocks(stack: G.StackGeometry) -> list[G.StackGeometry]:
    """The parallel blocks of a stack as separate stacks (as several axial series would be)."""
    blocks = []
    for idx in G.parallel_groups(stack.normals):
        blocks.append(G.StackGeometry.build(stack.positions[idx], stack.orientations[idx],
                                            stack.pixel_spacing[idx], stack.shapes[idx],
                                            stack.instance_numbers[idx]))
    return blocks


def test_sagittal_discs_map_to_labelled_axial_slices(synth):
    out, summary = synth
    coords = pd.read_csv(out / "train_label_coordinates.csv")
    series = pd.read_csv(out / "train_series_descriptions.csv")
    kinds = {info["stacks"] for info in summary.series.values()
             if info["description"] == SERIES_DESCRIPTIONS[2]}
    assert kinds == {1, 5}  # both axial layouts are exercised
    checked = 0
    for study in summary.train_ids:
        ids = series[series.study_id == study].set_index("series_description")["series_id"]
        folder = out / "train_images" / str(study)
        sag = dicom.read_series(folder / str(ids[SERIES_DESCRIPTIONS[1]]), load_pixels=False)
        axials = dicom.read_stacks(folder / str(ids[SERIES_DESCRIPTIONS[2]]), load_pixels=False)
        stacks = [G.StackGeometry.from_volume(v, _per_slice_orientations(v)) for v in axials]
        blocks = [b for s in stacks for b in _split_blocks(s)]
        rows = coords[coords.study_id == study]
        for level in LEVEL_TITLES:
            at_level = rows[rows.level == level]
            spinal = at_level[at_level.condition == "Spinal Canal Stenosis"].iloc[0]
            j = sag.index_of(spinal.instance_number)
            point = G.pixel_to_patient(sag.positions[j], sag.orientation, sag.pixel_spacing[j],
                                       spinal.x, spinal.y)
            truth = rows[(rows.condition == "Left Subarticular Stenosis")
                         & (rows.level == level)].iloc[0].instance_number
            for candidates in (stacks, blocks):
                match, reason = G.locate_point(point, candidates)
                assert reason is None, (study, level, reason)
                assert abs(match.instance_number - truth) <= 1, (study, level)
                assert match.inside and abs(match.distance_mm) < 4.0
            checked += 1
    assert checked == 15
