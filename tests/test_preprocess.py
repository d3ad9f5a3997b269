"""Preprocessing transforms checked against hand-computed values."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pydicom
import pytest

from dicom_fixtures import write_series
from spinegrade.config import DataConfig
from spinegrade.data.preprocess import (
    Clahe,
    CoordinateOutOfImage,
    CropRequest,
    CropResize,
    FileWindow,
    FixedWindow,
    PercentileWindow,
    WindowStack,
    apply_window,
    build_cropper,
    crop_box,
    crop_radius_px,
    crop_with_padding,
    map_point,
    slice_indices,
)
from spinegrade.io.dicom import read_series

NAN = (float("nan"), float("nan"))


def test_fixed_window_on_a_ramp():
    # Soft window (50, 350) spans [-125, 225]: -125 -> 0, 225 -> 255, 15 -> 140 * 255/350 = 102.
    ramp = np.array([[-1000.0, -125.0, 15.0, 225.0, 4000.0]], dtype=np.float32)
    assert FixedWindow(50, 350)(ramp).tolist() == [[0, 0, 102, 255, 255]]
    # Bone window (400, 2000) spans [-600, 1400]: 10 -> 610 * 255/2000 = 77.8 -> 78;
    # 402 -> 1002 * 255/2000 = 127.8 -> 128.
    assert FixedWindow(400, 2000)(np.array([[10.0, 402.0, 1400.0]])).tolist() == [[78, 128, 255]]


def test_percentile_and_file_windows():
    ramp = np.arange(1001, dtype=np.float32)[None, :]  # 0..1000
    # Percentiles 10/90 of 0..1000 are 100/900; 260 -> 160 * 255/800 = 51.
    assert PercentileWindow(10, 90).bounds(ramp, NAN) == (100.0, 900.0)
    assert PercentileWindow(10, 90)(ramp)[0, 260] == 51
    file_window = FileWindow(PercentileWindow(0, 100))
    # The file's own window (center 100, width 200) -> [0, 200]: 40 -> 51.
    assert file_window.bounds(ramp, (100.0, 200.0)) == (0.0, 200.0)
    assert file_window(ramp, (100.0, 200.0))[0, 40] == 51
    # No window in the file (NaN) or a zero width -> the percentile fallback [0, 1000].
    assert file_window.bounds(ramp, NAN) == (0.0, 1000.0)
    assert file_window.bounds(ramp, (100.0, 0.0)) == (0.0, 1000.0)


def test_window_stack_and_constant_image():
    values = np.array([[-125.0, 15.0, 225.0, 402.0, 1400.0]], dtype=np.float32)
    stack = WindowStack([FixedWindow(50, 350), FixedWindow(400, 2000),
                         FileWindow(PercentileWindow(0, 100))])
    out = stack(values, (100.0, 200.0))
    assert out.shape == (3, 1, 5) and out.dtype == np.uint8
    # Soft [-125, 225]: 15 -> 140 * 255/350 = 102. Bone [-600, 1400] (x 255/2000):
    # -125 -> 60.56 -> 61, 15 -> 78.41 -> 78, 225 -> 105.19 -> 105, 402 -> 127.76 -> 128.
    # File window (100, 200) = [0, 200]: 15 -> 19.125 -> 19.
    assert out[:, 0].tolist() == [[0, 102, 255, 255, 255], [61, 78, 105, 128, 255],
                                  [0, 19, 255, 255, 255]]
    # No file window: the 0/100 percentile fallback spans [-125, 1400] (x 255/1525):
    # 15 -> 23.41 -> 23, 225 -> 58.52 -> 59, 402 -> 88.12 -> 88.
    assert stack(values, NAN)[2, 0].tolist() == [0, 23, 59, 88, 255]
    img = np.full((4, 5), 7.0, dtype=np.float32)
    out = WindowStack([FixedWindow(50, 350), FixedWindow(400, 2000), PercentileWindow(1, 99)])(img)
    # 7 -> soft 132 * 255/350 = 96.17 -> 96, bone 607 * 255/2000 = 77.39 -> 77; a constant
    # image has a degenerate percentile window [7, 8]: 7 -> 0.
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8
    assert [np.unique(out[c]).tolist() for c in range(3)] == [[96], [77], [0]]
    assert apply_window(img, 7.0, 7.0).max() == 0  # degenerate window: no division by zero


def test_clahe_matches_opencv_per_channel():
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (3, 40, 48), dtype=np.uint8)
    out = Clahe(2.0, 8)(chw)
    ref = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    assert out.shape == chw.shape and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[c], ref.apply(chw[c]))


def test_crop_at_origin_is_zero_padded_not_shifted():
    hwc = (np.arange(20 * 20).reshape(20, 20, 1) % 250 + 1).astype(np.uint8).repeat(3, 2)
    assert crop_box(0.0, 0.0, 5, 5) == (-5, -5, 5, 5)
    patch = crop_with_padding(hwc, crop_box(0.0, 0.0, 5, 5))
    assert patch.shape == (10, 10, 3)
    assert not patch[:5].any() and not patch[:, :5].any()  # outside (top-left quadrant+): zeros
    np.testing.assert_array_equal(patch[5:, 5:], hwc[:5, :5])  # inside: unshifted
    # Bottom-right corner: the image fills the top-left quadrant only.
    patch = crop_with_padding(hwc, crop_box(19.0, 19.0, 5, 5))
    np.testing.assert_array_equal(patch[:6, :6], hwc[14:, 14:])
    assert not patch[6:].any() and not patch[:, 6:].any()
    # Half pixels round up (DICOM pixel centres), not to even.
    assert crop_box(2.5, 3.49, 1, 1) == (2, 2, 4, 4)
    # Through CropResize (no resize at size 10): channel-first, same zeros.
    out = CropResize(10)(hwc, 0.0, 0.0, 5, 5)
    assert out.shape == (3, 10, 10) and not out[:, :5, :5].any()
    np.testing.assert_array_equal(out[:, 5:, 5:], hwc[:5, :5].transpose(2, 0, 1))


def test_crop_resize_output_size():
    hwc = np.full((50, 60, 3), 200, dtype=np.uint8)
    out = CropResize(16, "area")(hwc, 30.0, 25.0, 12, 12)
    assert out.shape == (3, 16, 16) and (out == 200).all()
    assert CropResize(16, "linear")(hwc, 0.0, 0.0, 12, 12)[:, 0, 0].tolist() == [0, 0, 0]


def test_slice_selection_and_edge_replication():
    assert slice_indices(1, 4, 7).tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert slice_indices(5, 10, 7).tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert slice_indices(0, 1, 3).tolist() == [0, 0, 0]


def test_radius_native_and_mm():
    assert crop_radius_px(224, 0.75, 0.0, (0.5, 0.5)) == (168, 168)
    # 20 mm over column spacing 0.8 -> rx 25; over row spacing 0.5 -> ry 40.
    assert crop_radius_px(224, 0.75, 20.0, (0.5, 0.8)) == (25, 40)
    with pytest.raises(ValueError):
        crop_radius_px(224, 0.75, 20.0, (float("nan"), 0.5))


def test_map_point_through_patient_coordinates():
    iop = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])  # sagittal: x along +y, y along -z
    src, dst = np.array([0.0, 0.0, 0.0]), np.array([3.0, 5.0, 0.0])
    # dst is 5 mm further along the row direction and twice as coarse.
    x, y = map_point(30.0, 8.0, src, np.array([0.5, 0.5]), dst, np.array([1.0, 1.0]), iop)
    assert (x, y) == pytest.approx(((30 * 0.5 - 5) / 1.0, 8 * 0.5 / 1.0))


def test_volume_cropper_order_replication_and_mm(tmp_path):
    # 4 sagittal slices, instance numbers shuffled: the reader returns decreasing k
    # (ascending along the normal), i.e. instances [2, 4, 1, 3].
    write_series(tmp_path / "s", n=4, shape=(40, 40), instance_numbers=[3, 1, 4, 2])
    vol = read_series(tmp_path / "s")
    assert vol.instance_numbers.tolist() == [2, 4, 1, 3]
    cfg = DataConfig(img_size=16, n_slices=7)
    cropper = build_cropper(cfg)
    plan = cropper.slice_plan(vol, CropRequest(4, 20.0, 20.0))
    assert [vol.instance_numbers[j] for j, *_ in plan] == [2, 2, 2, 4, 1, 3, 3]
    assert {(rx, ry) for *_, rx, ry in plan} == {(12, 12)}  # 0.75 * 16
    (crop,) = cropper(vol, [CropRequest(4, 20.0, 20.0)])
    assert crop.shape == (7, 3, 16, 16) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop[0], crop[2])  # replicated edge
    np.testing.assert_array_equal(crop[5], crop[6])
    assert not np.array_equal(crop[3], crop[4])
    # 5 mm radius at PixelSpacing 0.5 mm -> 10 px half-width.
    mm = build_cropper(DataConfig(img_size=16, crop_radius_mm=5.0))
    assert mm.slice_plan(vol, CropRequest(4, 20.0, 20.0))[3][3:] == (10, 10)
    # Out-of-image and unknown instances are returned as errors, not raised.
    errors = cropper(vol, [CropRequest(4, 40.0, 3.0), CropRequest(99, 1.0, 1.0)])
    assert isinstance(errors[0], CoordinateOutOfImage) and isinstance(errors[1], KeyError)


def test_neighbour_with_other_grid_is_mapped(tmp_path):
    # Slice k=1 is 64x64 (others 40x40) and shifted 5 mm along the row direction (+y).
    positions = [(-10.0, 0, 0), (0.0, 5.0, 0), (10.0, 0, 0)]
    write_series(tmp_path / "s", n=3, shapes=[(40, 40), (64, 64), (40, 40)],
                 positions=positions, pixel_spacing=(0.5, 0.5))
    vol = read_series(tmp_path / "s")
    cropper = build_cropper(DataConfig(img_size=8, n_slices=3))
    centre = int(vol.instance_numbers[0])  # ascending along -x: k=2 first
    plan = cropper.slice_plan(vol, CropRequest(centre, 20.0, 12.0))
    assert [j for j, *_ in plan] == [0, 0, 1]
    assert plan[1][1:3] == (20.0, 12.0)  # same grid: raw pixels reused
    j, x, y, _, _ = plan[2]
    assert vol.slices[j].shape == (64, 64)
    assert (x, y) == pytest.approx((20.0 - 10.0, 12.0))  # 5 mm / 0.5 mm = 10 px


def test_neighbour_on_same_grid_but_shifted_in_plane_is_mapped(tmp_path):
    # All slices 40x40 at 0.5 mm, but slice k=0 is shifted 3 mm along +y (the row direction
    # of the sagittal fixture): the same (x, y) there is other anatomy.
    positions = [(-10.0, 3.0, 0), (0.0, 0.0, 0), (10.0, 0.0, 0)]
    write_series(tmp_path / "s", n=3, shapes=[(40, 40)] * 3, positions=positions,
                 pixel_spacing=(0.5, 0.5))
    vol = read_series(tmp_path / "s")
    cropper = build_cropper(DataConfig(img_size=8, n_slices=3))
    centre = int(vol.instance_numbers[1])  # k=1, the unshifted middle slice
    plan = {j: (x, y) for j, x, y, _, _ in cropper.slice_plan(vol, CropRequest(centre, 20.0, 12.0))}
    shifted = int(np.argmax(vol.positions[:, 1]))  # the slice whose IPP y is 3 mm
    unshifted = [j for j in plan if j != shifted and j != 1]
    assert plan[1] == (20.0, 12.0)
    assert plan[unshifted[0]] == (20.0, 12.0)  # parallel, no in-plane offset: raw pixels
    assert plan[shifted] == pytest.approx((20.0 - 6.0, 12.0))  # 3 mm / 0.5 mm = 6 px


def _is_tie(v: np.ndarray) -> np.ndarray:
    """Integer values whose exact window value (v - low) * 255 / w ends in .5 (default windows
    (50, 350), (400, 2000) and the file's (600, 800)), in exact integer arithmetic."""
    tie = np.zeros(v.shape, dtype=bool)
    for low, w in [(-125, 350), (-600, 2000), (200, 800)]:
        inside = (v > low) & (v < low + w)
        tie |= inside & ((2 * (v - low) * 255) % (2 * w) == w)
    return tie


def _expected_crop(path, x: float, y: float, cfg: DataConfig) -> np.ndarray:
    """The labelled slice's crop recomputed from the file with numpy + OpenCV only.

    Windows (docs: ``center +- width / 2`` linearly onto 0..255, clipped, rounded), CLAHE
    per channel, a ``2r x 2r`` box centred on pixel ``floor(x + 0.5)`` with zero padding,
    then ``cv2.resize`` to ``img_size``: channel-first ``(3, S, S)`` uint8.
    """
    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1.0)) \
        + float(getattr(ds, "RescaleIntercept", 0.0))
    windows = [cfg.soft_window, cfg.bone_window, (float(ds.WindowCenter), float(ds.WindowWidth))]
    clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip_limit,
                            tileGridSize=(cfg.clahe_tile_grid, cfg.clahe_tile_grid))
    channels = []
    for center, width in windows:
        low = center - width / 2
        grey = np.rint(np.clip((img - low) / width, 0.0, 1.0) * 255.0).astype(np.uint8)
        channels.append(clahe.apply(grey))
    hwc = np.stack(channels, -1)
    r = round(cfg.crop_radius_scale * cfg.img_size)
    cx, cy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    padded = np.pad(hwc, ((2 * r, 2 * r), (2 * r, 2 * r), (0, 0)))  # zeros outside the image
    patch = padded[cy - r + 2 * r:cy + r + 2 * r, cx - r + 2 * r:cx + r + 2 * r]
    flag = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}[cfg.resize_interpolation]
    return cv2.resize(patch, (cfg.img_size, cfg.img_size), interpolation=flag).transpose(2, 0, 1)


@pytest.mark.parametrize("interpolation", ["area", "linear"])
def test_crop_pixels_equal_an_independent_recomputation(tmp_path, interpolation):
    def pixels(k, shape):
        rng = np.random.default_rng(k)
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        v = 5 * xx + 8 * yy + rng.integers(0, 400, shape)  # 0..~1000
        # No value may land exactly half-way between two grey levels in any window (e.g.
        # 280 in [200, 1000] -> 25.5): float32 arithmetic decides such ties either way.
        while (tie := _is_tie(v)).any():
            v = v + tie
        return v.astype(np.uint16)

    files = write_series(tmp_path / "s", n=5, shape=(48, 56), pixel_fn=pixels,
                         window=(600, 800), instance_numbers=[4, 2, 5, 1, 3])
    cfg = DataConfig(img_size=16, n_slices=3, resize_interpolation=interpolation)
    cropper = build_cropper(cfg)
    vol = read_series(tmp_path / "s")
    # Slice k = 2 is instance 5; one box inside the image, one crossing its left/top edges.
    for x, y in [(30.2, 20.5), (3.5, 6.0)]:
        (crop,) = cropper(vol, [CropRequest(5, x, y)])
        expected = _expected_crop(files[2], x, y, cfg)
        assert expected.shape == (3, 16, 16) and expected.std() > 0
        np.testing.assert_array_equal(crop[1], expected)
    # The edge box really is zero-padded: its top-left output pixels are 0 in every channel.
    assert not crop[1][:, 0, 0].any()


def test_v4_v7_single_window_and_tight_crop(tmp_path):
    """The plan: v4-v7 used a single intensity window and crop radius img_size // 2."""
    from spinegrade.config import load_config

    write_series(tmp_path / "s", n=4, shape=(40, 40), instance_numbers=[3, 1, 4, 2])
    vol = read_series(tmp_path / "s")
    v4, v8 = load_config("v4", ["data.img_size=16"]).data, load_config("v8", ["data.img_size=16"]).data
    single, three = build_cropper(v4), build_cropper(v8)
    req = CropRequest(4, 20.0, 20.0)
    assert {(rx, ry) for *_, rx, ry in single.slice_plan(vol, req)} == {(8, 8)}   # 16 // 2
    (crop,) = single(vol, [req])
    np.testing.assert_array_equal(crop[:, 0], crop[:, 1])   # one window on every channel
    np.testing.assert_array_equal(crop[:, 0], crop[:, 2])
    # The first channel is v8's first (soft-tissue) window on the same 8-px-radius crop.
    (ref,) = build_cropper(dataclasses.replace(v8, crop_radius_scale=0.5))(vol, [req])
    np.testing.assert_array_equal(crop[:, 0], ref[:, 0])
    (rgb,) = three(vol, [req])
    assert not np.array_equal(rgb[:, 0], rgb[:, 1])          # v8: three different windows
