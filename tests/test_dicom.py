"""The DICOM series reader: decoding, slice order, stacks, odd tags and broken files.

Expected values are computed by hand from the fixture geometry (see ``dicom_fixtures``):
slice k of n=5 sits at IPP step coordinate (k - 2) * 10 mm, its stored corner value is
100 * (k + 1), the sagittal normal is (-1, 0, 0) and the axial normal (0, 0, 1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_fixtures import gdcm_transcode, instance_order, write_broken_file, write_series
from spinegrade.errors import UserError
from spinegrade.io import geometry
from spinegrade.io.dicom import SeriesReadError, read_series, read_stacks
from spinegrade.io.dicom_file import PixelDecodeError, UnusableFileError, read_pixels
from spinegrade.problems import Problem


def _testdata(name: str) -> Path:
    """A DICOM file bundled with pydicom or pydicom-data (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:  # pydicom-data is a required dev dependency: missing is a broken setup
        pytest.fail(f"{name} is not installed; install the dev dependencies (pydicom-data)")
    return Path(path)


def _series_of(tmp_path: Path, *names: str) -> Path:
    """A series folder holding copies of bundled files."""
    folder = tmp_path / "series"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, 1):
        shutil.copy(_testdata(name), folder / f"{i}.dcm")
    return folder


def _corners(volume) -> list[float]:
    return [float(s[0, 0]) for s in volume.slices]


# --- Real files shipped with pydicom / pydicom-data -------------------------------------------

MR_SMALL = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
            "MR_small_expb.dcm", "MR_small_padded.dcm"]


@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding")
@pytest.mark.parametrize("name", MR_SMALL[1:])
def test_bundled_mr_small_encodings_decode_to_the_same_pixels(tmp_path, name):
    reference = read_series(_series_of(tmp_path / "ref", "MR_small.dcm"))
    volume = read_series(_series_of(tmp_path / "enc", name))
    expected = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array.astype(np.float32)
    assert volume.slices[0].dtype == np.float32
    np.testing.assert_array_equal(reference.slices[0], expected)
    np.testing.assert_array_equal(volume.slices[0], expected)
    assert volume.problems == []


@pytest.mark.parametrize("name", ["emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"])
def test_bundled_multiframe_mr_encodings_decode_to_the_same_pixels(name):
    # Multi-frame files are not series slices; read_pixels decodes them file by file.
    # Reference: pydicom's own decoding of the uncompressed file, rescaled (MONOCHROME2).
    ds = pydicom.dcmread(_testdata("emri_small.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    expected = (ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1.0))
                + float(ds.get("RescaleIntercept", 0.0))).astype(np.float32)
    assert expected.shape == (10, 64, 64) and np.unique(expected).size > 100
    got = read_pixels(_testdata(name))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(read_pixels(_testdata("emri_small.dcm")), expected)


def test_read_pixels_rejects_non_dicom(tmp_path):
    with pytest.raises(UnusableFileError, match="not a DICOM file"):
        read_pixels(write_broken_file(tmp_path / "a.txt", "text"))


def test_bundled_mr_small_as_jpeg_lossless(tmp_path):
    # No MR file ships JPEG lossless (process 14), so transcode MR_small with GDCM.
    folder = _series_of(tmp_path, "MR_small.dcm")
    gdcm_transcode(folder / "1.dcm", pydicom.uid.JPEGLosslessSV1)
    volume = read_series(folder)
    assert volume.transfer_syntax_uid == pydicom.uid.JPEGLosslessSV1
    expected = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(volume.slices[0], expected)


def test_bundled_mr_small_metadata(tmp_path):
    volume = read_series(_series_of(tmp_path, "MR_small.dcm"))
    assert volume.transfer_syntax == "Explicit VR Little Endian"
    np.testing.assert_allclose(volume.positions[0], [-83.9063, -91.2, 6.6406])
    np.testing.assert_allclose(volume.normal, [0, 0, 1])  # IOP (1,0,0),(0,1,0): axial
    assert volume.orientation_label == "AX"
    assert volume.windows[0, 0] == 600


def test_bundled_mr2_jpeg2000_lossless_with_rescale(tmp_path):
    raw = pydicom.dcmread(_testdata("MR2_UNCR.dcm")).pixel_array.astype(np.float32)
    expected = raw * np.float32(3.774114) + np.float32(0.000061)  # the file's slope/intercept
    for name in ("MR2_UNCR.dcm", "MR2_J2KR.dcm"):
        volume = read_series(_series_of(tmp_path / name, name))
        np.testing.assert_allclose(volume.slices[0], expected, rtol=1e-6)
    assert volume.orientation_label == "SAG"  # normal (0.822, -0.569, 0): dominant L-R


def test_bundled_multiframe_file_is_reported_not_crashed_on(tmp_path):
    folder = _series_of(tmp_path, "MR_small.dcm", "emri_small_RLE.dcm")
    volume = read_series(folder)
    assert len(volume) == 1
    assert volume.problems == [Problem.skipped(
        kind="unreadable_file", file=str(folder / "2.dcm"),
        message="multi-frame file (10 frames) is not supported")]


def test_broken_files_are_listed_in_problems(tmp_path):
    folder = _series_of(tmp_path, "MR_small.dcm", "MR_truncated.dcm")
    write_broken_file(folder / "3.dcm", "truncated", source=folder / "1.dcm")
    write_broken_file(folder / "4.dcm", "empty")
    write_broken_file(folder / "notes.txt", "text")
    write_broken_file(folder / "5.dcm", "header_only", source=folder / "1.dcm")
    volume = read_series(folder)
    assert len(volume) == 1 and volume.files == [folder / "1.dcm"]
    reasons = {Path(p.file).name: p.message for p in volume.problems}
    assert set(reasons) == {"2.dcm", "3.dcm", "4.dcm", "notes.txt", "5.dcm"}
    assert reasons["2.dcm"].startswith("cannot decode pixels")  # header fine, pixels short
    assert reasons["4.dcm"] == "empty file"
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["5.dcm"] == "no pixel data"


def test_nothing_readable_raises_a_user_error_naming_the_folder(tmp_path):
    folder = tmp_path / "bad"
    write_broken_file(folder / "1.dcm", "empty")
    write_broken_file(folder / "2.dcm", "text")
    with pytest.raises(SeriesReadError, match="bad: none of its 2 files") as info:
        read_series(folder)
    assert isinstance(info.value, UserError)
    with pytest.raises(SeriesReadError, match="not a folder"):
        read_series(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeriesReadError, match="no files"):
        read_series(tmp_path / "empty")


# --- Decoding synthetic series ---------------------------------------------------------------


@pytest.mark.parametrize("syntax", ["rle", "j2k", "jpegls", "jpeg_lossless"])
def test_compressed_series_decode_like_the_uncompressed_one(tmp_path, syntax):
    write_series(tmp_path / "raw", order="shuffled")
    write_series(tmp_path / syntax, order="shuffled", transfer_syntax=syntax)
    raw, packed = read_series(tmp_path / "raw"), read_series(tmp_path / syntax)
    assert packed.transfer_syntax != raw.transfer_syntax
    # Sagittal, ascending along the normal (-1, 0, 0): k = 4 first; corner of slice k is
    # 100 (k + 1), and slice k holds the k-th of the shuffled instance numbers.
    assert _corners(packed) == [500, 400, 300, 200, 100]
    assert packed.instance_numbers.tolist() == instance_order(5, "shuffled")[::-1]
    np.testing.assert_array_equal(packed.instance_numbers, raw.instance_numbers)
    for a, b in zip(raw.slices, packed.slices, strict=True):
        np.testing.assert_array_equal(a, b)


def test_monochrome1_is_inverted_within_bits_stored(tmp_path):
    write_series(tmp_path, orientation="ax", monochrome1=True, window=(1000, 400))
    volume = read_series(tmp_path)
    # 12-bit unsigned: v' = 4095 - v; slice k has corner 100 (k + 1).
    assert _corners(volume) == [3995, 3895, 3795, 3695, 3595]
    assert volume.slices[0][0, 1] == 4095 - 101
    assert volume.windows[0].tolist() == [4095 - 1000, 400]


def test_rescale_slope_intercept(tmp_path):
    write_series(tmp_path / "a", orientation="ax", slope=2.0, intercept=-1000.0)
    assert _corners(read_series(tmp_path / "a")) == [-800, -600, -400, -200, 0]
    write_series(tmp_path / "b", orientation="ax", slope=2.0, intercept=-1000.0, monochrome1=True)
    # range [0*2-1000, 4095*2-1000] = [-1000, 7190]; v' = 6190 - v
    assert _corners(read_series(tmp_path / "b")) == [6990, 6790, 6590, 6390, 6190]


# --- Slice order ----------------------------------------------------------------------------

# Instance number of slice k=0..4 for each order (instance_order with seed 0 for shuffled).
ORDERS = {"sorted": [1, 2, 3, 4, 5], "reversed": [5, 4, 3, 2, 1], "shuffled": [3, 1, 5, 2, 4]}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_sagittal_order_follows_the_normal_not_instance_numbers(tmp_path, order):
    write_series(tmp_path, orientation="sag", instance_numbers=ORDERS[order])
    volume = read_series(tmp_path)
    # IPP x = -20..20 for k = 0..4; normal (-1,0,0) so ascending IPP.normal is k = 4..0.
    k_order = [4, 3, 2, 1, 0]
    np.testing.assert_array_equal(volume.normal, [-1, 0, 0])
    np.testing.assert_array_equal(volume.positions[:, 0], [20, 10, 0, -10, -20])
    np.testing.assert_array_equal(volume.normal_positions, [-20, -10, 0, 10, 20])
    assert volume.instance_numbers.tolist() == [ORDERS[order][k] for k in k_order]
    assert _corners(volume) == [100 * (k + 1) for k in k_order]
    assert volume.orientation_label == "SAG" and volume.slice_spacing == 10.0
    assert volume.index_of(ORDERS[order][0]) == 4


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_axial_order_follows_the_normal_not_instance_numbers(tmp_path, order):
    write_series(tmp_path, orientation="ax", instance_numbers=ORDERS[order], spacing=4.0,
                 origin=(0, 0, 100))
    volume = read_series(tmp_path)
    # IPP z = 92, 96, 100, 104, 108 for k = 0..4; normal (0,0,1): k ascending.
    np.testing.assert_array_equal(volume.normal_positions, [92, 96, 100, 104, 108])
    assert volume.instance_numbers.tolist() == ORDERS[order]
    assert _corners(volume) == [100, 200, 300, 400, 500]
    assert volume.orientation_label == "AX" and volume.slice_spacing == 4.0
    expected_order = {"sorted": "ascending", "reversed": "descending", "shuffled": "shuffled"}
    assert volume.instance_order == expected_order[order]
    assert volume.instance_order_matches == (order == "sorted")
    with pytest.raises(KeyError):
        volume.index_of(99)


def test_headers_only_read_gives_the_same_order(tmp_path):
    write_series(tmp_path, orientation="sag", order="shuffled")
    full, headers = read_series(tmp_path), read_series(tmp_path, load_pixels=False)
    assert headers.slices == []
    np.testing.assert_array_equal(headers.instance_numbers, full.instance_numbers)
    np.testing.assert_array_equal(headers.shapes, [[32, 32]] * 5)


def test_duplicate_positions_are_kept_in_instance_order(tmp_path):
    # Two slices at z=0 (instances 4 and 2), two at z=10 (instances 5 and 1), one at z=20.
    z = [0, 10, 0, 20, 10]
    write_series(tmp_path, orientation="ax", positions=[(0, 0, v) for v in z],
                 instance_numbers=[4, 5, 2, 3, 1])
    volume = read_series(tmp_path)
    assert volume.instance_numbers.tolist() == [2, 4, 1, 5, 3]
    assert volume.normal_positions.tolist() == [0, 0, 10, 10, 20]
    reasons = [p.message for p in volume.problems]
    assert any("instances [2, 4] share the position 0.000" in r for r in reasons)
    assert any("instances [1, 5] share the position 10.000" in r for r in reasons)


def test_missing_geometry_falls_back_to_instance_numbers(tmp_path):
    write_series(tmp_path, instance_numbers=[3, 1, 5, 2, 4], drop_tags=["ImagePositionPatient"])
    volume = read_series(tmp_path)
    assert volume.instance_numbers.tolist() == [1, 2, 3, 4, 5]
    assert volume.orientation_label == "unknown"
    assert np.isnan(volume.slice_spacing)
    assert any("ordered by InstanceNumber" in p.message for p in volume.problems)


def test_missing_instance_number_taken_from_file_name(tmp_path):
    write_series(tmp_path, orientation="ax", drop_tags=["InstanceNumber"])
    volume = read_series(tmp_path)
    assert volume.instance_numbers.tolist() == [1, 2, 3, 4, 5]
    assert len(volume.problems) == 5


# --- Stacks ----------------------------------------------------------------------------------


def _two_stack_series(folder: Path) -> None:
    """One series: sagittal instances 1..6 (x = -25..25) and axial instances 50..52."""
    write_series(folder, orientation="sag", n=6, series_uid="1.2.3", order="reversed")
    write_series(folder, orientation="ax", n=3, series_uid="1.2.3", start_instance=50,
                 pixel_fn=lambda k, shape: np.full(shape, 7 + k, np.uint16))


def test_two_stack_series_is_split_and_the_labelled_stack_chosen(tmp_path):
    _two_stack_series(tmp_path)
    largest = read_series(tmp_path)
    assert largest.orientation_label == "SAG" and len(largest) == 6
    axial = read_series(tmp_path, instance_numbers=[51])
    assert axial.orientation_label == "AX"
    assert axial.instance_numbers.tolist() == [50, 51, 52]
    assert _corners(axial) == [7, 8, 9]
    assert any("2 stacks" in p.message for p in axial.problems)
    # Labels on both stacks: the stack holding most of them wins, the rest are reported.
    sag = read_series(tmp_path, instance_numbers=[1, 2, 50])
    assert sag.orientation_label == "SAG"
    assert any("[50] are not in the stack read" in p.message for p in sag.problems)
    stacks = read_stacks(tmp_path)
    assert [v.orientation_label for v in stacks] == ["SAG", "AX"]
    assert [len(v) for v in stacks] == [6, 3]


def test_tilted_axial_blocks_stay_in_one_stack(tmp_path):
    tilt = np.radians(15)
    write_series(tmp_path, orientation="ax", n=3, series_uid="1.9", origin=(0, 0, 0))
    write_series(tmp_path, orientation="ax", n=3, series_uid="1.9", origin=(0, 0, 40),
                 start_instance=10,
                 iop=(1, 0, 0, 0, np.cos(tilt), np.sin(tilt)))
    (volume,) = read_stacks(tmp_path)
    # First block's IOP is the reference (3 slices each; first seen wins the tie).
    assert volume.instance_numbers.tolist() == [1, 2, 3, 10, 11, 12]
    assert any("not parallel (normals differ by up to 15.0 deg)" in p.message
               for p in volume.problems)


# --- Odd and missing tags --------------------------------------------------------------------


def test_window_tags_multi_valued_single_and_missing(tmp_path):
    write_series(tmp_path / "multi", window=([600, 800], [1200, 1600]))
    write_series(tmp_path / "single", window=(600, 1200))
    write_series(tmp_path / "none")
    assert read_series(tmp_path / "multi").windows[0].tolist() == [600, 1200]
    assert read_series(tmp_path / "single").windows[0].tolist() == [600, 1200]
    assert np.isnan(read_series(tmp_path / "none").windows).all()


def test_missing_optional_tags_do_not_matter(tmp_path):
    write_series(tmp_path, spacing=3.3, drop_tags=["SpacingBetweenSlices", "SliceThickness",
                                                   "PixelSpacing", "SeriesDescription"])
    volume = read_series(tmp_path)
    assert volume.slice_spacing == pytest.approx(3.3)
    assert np.isnan(volume.pixel_spacing).all()
    assert volume.series_description == ""
    assert [p.message for p in volume.problems] == ["5 slices without PixelSpacing"]


def test_slices_of_different_shapes(tmp_path):
    shapes = [(32, 32), (32, 32), (48, 40), (32, 32), (48, 40)]
    write_series(tmp_path, orientation="ax", shapes=shapes)
    volume = read_series(tmp_path)
    assert [s.shape for s in volume.slices] == shapes
    assert volume.shapes.tolist() == [list(s) for s in shapes]
    assert [p.message for p in volume.problems] == [
        "slices of different shapes: 32x32 (3), 48x40 (2)"]
    with pytest.raises(ValueError, match="different shapes"):
        volume.array()


def test_orientation_labels_by_hand():
    assert geometry.orientation_label(np.array([0.0, 0.0, 1.0])) == "AX"
    assert geometry.orientation_label(np.array([-1.0, 0.0, 0.0])) == "SAG"
    assert geometry.orientation_label(np.array([0.0, 1.0, 0.0])) == "COR"
    # 20 deg tilt from axial: largest component cos 20 = 0.94 -> still AX.
    t = np.radians(20)
    assert geometry.orientation_label(np.array([0.0, np.sin(t), np.cos(t)])) == "AX"
    # 45 deg between sagittal and coronal: 0.707 < 0.8 -> oblique.
    assert geometry.orientation_label(np.array([0.7071, 0.7071, 0.0])) == "oblique"
    assert geometry.orientation_label(np.full(3, np.nan)) == "unknown"


def test_lazy_read_decodes_on_access_and_still_drops_truncated_files(tmp_path):
    folder = tmp_path / "s"
    write_series(folder, order="shuffled")
    write_broken_file(folder / "9.dcm", "truncated", source=sorted(folder.glob("*.dcm"))[0])
    eager = read_series(folder)
    lazy = read_series(folder, lazy_pixels=True)
    # The truncated file is found by its PixelData length, without decoding anything.
    assert lazy.problems == eager.problems and lazy.files == eager.files
    assert lazy.slices.n_decoded == 0
    np.testing.assert_array_equal(lazy.slices[2], eager.slices[2])
    assert lazy.slices.n_decoded == 1
    assert len(lazy.slices) == len(eager.slices)
    np.testing.assert_array_equal(np.stack(list(lazy.slices)), np.stack(eager.slices))


def test_lazy_read_raises_on_a_slice_that_cannot_be_decoded(tmp_path):
    folder = tmp_path / "s"
    write_series(folder, n=3, transfer_syntax="rle")
    bad = sorted(folder.glob("*.dcm"))[1]
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[:40] + b"\0" * (len(ds.PixelData) - 40)  # same length, garbage
    ds.save_as(bad)
    lazy = read_series(folder, lazy_pixels=True)
    eager = read_series(folder)
    assert len(lazy) == 3 and len(eager) == 2  # the eager reader drops it
    j = lazy.files.index(bad)
    with pytest.raises(PixelDecodeError, match="cannot decode pixels"):
        lazy.slices[j]
