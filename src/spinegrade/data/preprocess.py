"""DICOM slices -> uint8 crops: windows, CLAHE, crop, resize, slice selection.

The seed pipeline, one transform per step (parameters in ``__init__``, a pure ``__call__``):

1. :class:`WindowStack`: three intensity windows of one float32 slice, stacked as channels
   (uint8, ``(3, H, W)``). Preset ``fixed``: soft tissue, bone, the file's own window;
   preset ``percentile``: two percentile windows and the file's own window. The file window
   falls back to a percentile window when the file has none.
2. :class:`Clahe`: contrast-limited adaptive histogram equalisation per channel.
3. :class:`CropResize`: a box of half-width ``(rx, ry)`` native pixels around ``(x, y)``,
   zero-padded where it leaves the image (never shifted), resized to ``img_size``
   (channel-last input, channel-first output).
4. :func:`slice_indices`: ``n_slices`` slices centred on the labeled one, in spatial order,
   edge slices replicated where the series is shorter.

Steps 1-2 run on whole slices (CLAHE depends on the whole image), once per slice;
:class:`VolumeCropper` then cuts any number of crops from the processed slices. It works
on an in-memory :class:`~spinegrade.io.dicom.Volume` with arbitrary ``(instance, x, y)``, so
predict-time code reuses it without labels. See ``docs/preprocessing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from spinegrade.io.geometry import patient_to_pixel, pixel_to_patient

# Bumped whenever the pixel output of this module changes for the same config, so caches
# made by older code are never reused (part of the cache key).
PREPROCESS_VERSION = 2

INTERPOLATIONS: dict[str, int] = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


class CoordinateOutOfImage(ValueError):
    """The requested (x, y) lies outside the labeled slice."""


# --- 1. windows --------------------------------------------------------------------------------


def apply_window(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly onto ``[0, 255]``, clip outside, round to uint8.

    Args:
        img: 2-D float array.
        low: value mapped to 0.
        high: value mapped to 255; raised to ``low + 1`` when not above ``low``.
    """
    if not high > low:
        high = low + 1.0
    clipped = np.clip(np.asarray(img, dtype=np.float32), np.float32(low), np.float32(high))
    scale = 255.0 / (high - low)
    # After clipping, |v * scale - low * scale| is the plain linear map (never negative);
    # OpenCV does the multiply-add, rounding and uint8 conversion in one pass.
    return cv2.convertScaleAbs(clipped, alpha=scale, beta=-low * scale)


class FixedWindow:
    """DICOM-style window: ``center +- width / 2`` mapped to ``[0, 255]``."""

    def __init__(self, center: float, width: float) -> None:
        self.center = float(center)
        self.width = float(width)

    def bounds(self, img: np.ndarray, file_window: tuple[float, float]) -> tuple[float, float]:
        """(low, high) of this window; independent of the image."""
        return self.center - self.width / 2.0, self.center + self.width / 2.0

    def __call__(self, img: np.ndarray, file_window: tuple[float, float] = (math.nan, math.nan)):
        return apply_window(img, *self.bounds(img, file_window))


class PercentileWindow:
    """Window from the slice's own intensity percentiles ``(low_pct, high_pct)``."""

    def __init__(self, low_pct: float, high_pct: float) -> None:
        self.low_pct = float(low_pct)
        self.high_pct = float(high_pct)

    def bounds(self, img: np.ndarray, file_window: tuple[float, float]) -> tuple[float, float]:
        """(low, high) at the configured percentiles of ``img``."""
        low, high = np.percentile(img, (self.low_pct, self.high_pct))
        return float(low), float(high)

    def __call__(self, img: np.ndarray, file_window: tuple[float, float] = (math.nan, math.nan)):
        return apply_window(img, *self.bounds(img, file_window))


class FileWindow:
    """The file's WindowCenter/WindowWidth; a percentile window where it has none."""

    def __init__(self, fallback: PercentileWindow) -> None:
        self.fallback = fallback

    def bounds(self, img: np.ndarray, file_window: tuple[float, float]) -> tuple[float, float]:
        """(low, high) from ``file_window`` = (center, width), or the fallback's bounds."""
        center, width = (float(v) for v in file_window)
        if math.isfinite(center) and math.isfinite(width) and width > 0:
            return center - width / 2.0, center + width / 2.0
        return self.fallback.bounds(img, file_window)

    def __call__(self, img: np.ndarray, file_window: tuple[float, float] = (math.nan, math.nan)):
        return apply_window(img, *self.bounds(img, file_window))


class ChannelWindow(Protocol):
    """Anything with ``bounds(img, file_window) -> (low, high)``."""

    def bounds(self, img: np.ndarray, file_window: tuple[float, float]) -> tuple[float, float]:
        ...


class WindowStack:
    """Several windows of one slice stacked as uint8 channels, ``(C, H, W)``."""

    def __init__(self, windows: Sequence[ChannelWindow]) -> None:
        self.windows = tuple(windows)

    def __call__(
        self, img: np.ndarray, file_window: tuple[float, float] = (math.nan, math.nan)
    ) -> np.ndarray:
        img = np.asarray(img, dtype=np.float32)
        out = np.empty((len(self.windows),) + img.shape, dtype=np.uint8)
        for c, w in enumerate(self.windows):
            out[c] = apply_window(img, *w.bounds(img, file_window))
        return out


# --- 2. CLAHE ----------------------------------------------------------------------------------


class Clahe:
    """OpenCV CLAHE applied to each uint8 channel of a ``(C, H, W)`` array."""

    def __init__(self, clip_limit: float, tile_grid: int) -> None:
        self.clip_limit = float(clip_limit)
        self.tile_grid = int(tile_grid)
        self._clahe = cv2.createCLAHE(clipLimit=self.clip_limit,
                                      tileGridSize=(self.tile_grid, self.tile_grid))

    def __call__(self, chw: np.ndarray) -> np.ndarray:
        out = np.empty_like(chw)
        for c in range(chw.shape[0]):
            self._clahe.apply(np.ascontiguousarray(chw[c]), dst=out[c])
        return out

    def __getstate__(self) -> dict[str, Any]:
        # cv2 CLAHE objects cannot be pickled (spawned workers); rebuild on unpickling.
        return {"clip_limit": self.clip_limit, "tile_grid": self.tile_grid}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["clip_limit"], state["tile_grid"])


class SliceTransform:
    """Whole-slice part of the pipeline: window stack, then CLAHE -> uint8 ``(3, H, W)``."""

    def __init__(self, windows: WindowStack, clahe: Clahe) -> None:
        self.windows = windows
        self.clahe = clahe

    def __call__(
        self, img: np.ndarray, file_window: tuple[float, float] = (math.nan, math.nan)
    ) -> np.ndarray:
        return self.clahe(self.windows(img, file_window))


# --- 3. crop + resize --------------------------------------------------------------------------


def crop_box(x: float, y: float, rx: int, ry: int) -> tuple[int, int, int, int]:
    """Integer box ``(x0, y0, x1, y1)`` (end exclusive) of size ``2rx x 2ry`` centred on (x, y).

    The centre pixel is ``floor(x + 0.5)``: pixel i covers [i - 0.5, i + 0.5) in DICOM's
    pixel-centre convention, so half-pixel coordinates round up, never to even.
    """
    cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
    return cx - rx, cy - ry, cx + rx, cy + ry


def crop_with_padding(hwc: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Cut ``box`` out of ``(H, W, ...)``; parts outside the image are zeros (not shifted).

    A box inside the image gives a view (no copy); one that leaves it, a zero-padded copy.
    """
    x0, y0, x1, y1 = box
    h, w = hwc.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return hwc[y0:y1, x0:x1]
    out = np.zeros((y1 - y0, x1 - x0) + hwc.shape[2:], dtype=hwc.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = hwc[sy0:sy1, sx0:sx1]
    return out


class CropResize:
    """Crop a channel-last ``(H, W, C)`` slice around (x, y), zero-padded, resize to ``size``.

    Returns channel-first ``(C, size, size)``. Slices are kept channel-last between CLAHE and
    cropping because OpenCV resizes all channels of an (H, W, C) view in one call.
    """

    def __init__(self, size: int, interpolation: str = "area") -> None:
        self.size = int(size)
        self.interpolation = interpolation
        self._flag = INTERPOLATIONS[interpolation]

    def __call__(self, hwc: np.ndarray, x: float, y: float, rx: int, ry: int) -> np.ndarray:
        patch = crop_with_padding(hwc, crop_box(x, y, rx, ry))
        if patch.shape[:2] != (self.size, self.size):
            patch = cv2.resize(patch, (self.size, self.size), interpolation=self._flag)
            if patch.ndim == 2:  # cv2 drops a single channel axis
                patch = patch[:, :, None]
        return patch.transpose(2, 0, 1)  # a view; callers copy it into their stack


def crop_radius_px(
    img_size: int, radius_scale: float, radius_mm: float, pixel_spacing: Sequence[float]
) -> tuple[int, int]:
    """Crop half-widths ``(rx, ry)`` in native pixels of a slice.

    ``radius_scale * img_size`` pixels in both directions, or, when ``radius_mm > 0``,
    ``radius_mm`` divided by the column (x) and row (y) spacing of the slice.

    Args:
        img_size: output side length.
        radius_scale: half-width in units of ``img_size`` (the seed's 0.75).
        radius_mm: half-width in millimetres; 0 disables.
        pixel_spacing: (row spacing, column spacing) in mm, as DICOM PixelSpacing.
    """
    if radius_mm > 0:
        row_sp, col_sp = (float(v) for v in pixel_spacing)
        if not (row_sp > 0 and col_sp > 0):
            raise ValueError(f"crop_radius_mm needs a valid PixelSpacing, got {pixel_spacing}")
        return max(1, round(radius_mm / col_sp)), max(1, round(radius_mm / row_sp))
    r = max(1, round(radius_scale * img_size))
    return r, r


# --- 4. slices and geometry --------------------------------------------------------------------


def slice_indices(center: int, n_total: int, n_slices: int) -> np.ndarray:
    """Indices of ``n_slices`` slices centred on ``center`` in ``[0, n_total)``.

    Offsets run ``-(n_slices // 2) .. ``; indices past either end repeat the edge slice,
    e.g. center 1 of 4 slices, 7 wanted -> ``[0, 0, 0, 1, 2, 3, 3]``.
    """
    if n_total < 1:
        raise ValueError("a series needs at least one slice")
    offsets = np.arange(n_slices) - n_slices // 2
    return np.clip(center + offsets, 0, n_total - 1)


def map_point(
    x: float, y: float, src_position: np.ndarray, src_spacing: np.ndarray,
    dst_position: np.ndarray, dst_spacing: np.ndarray, orientation: np.ndarray,
) -> tuple[float, float]:
    """Pixel (x, y) of one slice -> pixel coordinates of a parallel slice, via patient mm.

    Args:
        x, y: column and row in the source slice.
        src_position, dst_position: (3,) ImagePositionPatient of each slice.
        src_spacing, dst_spacing: (2,) PixelSpacing (row spacing, column spacing).
        orientation: (6,) ImageOrientationPatient shared by both slices.
    """
    point = pixel_to_patient(src_position, orientation, src_spacing, x, y)
    dst_x, dst_y, _ = patient_to_pixel(point, dst_position, orientation, dst_spacing)
    return dst_x, dst_y


def _shifted_in_plane(volume: Any, c: int, j: int, spacing: np.ndarray) -> bool:
    """Whether slice ``j``'s pixel grid is offset from slice ``c``'s within the image plane.

    Parallel slices of one stack normally differ only along the normal; an in-plane offset
    (a second slab, a moved field of view) means the same (x, y) is other anatomy. Missing
    geometry counts as not shifted.
    """
    delta = np.asarray(volume.positions[j], np.float64) - np.asarray(volume.positions[c], np.float64)
    orientation = np.asarray(volume.orientation, np.float64)
    shift = np.array([delta @ orientation[:3] / spacing[1], delta @ orientation[3:6] / spacing[0]])
    return bool(np.all(np.isfinite(shift)) and np.any(np.abs(shift) > 0.01))


# --- the whole pipeline on a volume ------------------------------------------------------------


@dataclass(frozen=True)
class CropRequest:
    """One crop to cut: a point on one instance of a series (no label needed).

    The last three fields are a training-time placement error (``data.jitter``): the centre
    slice moved by ``slice_offset`` slices in spatial order, the point by ``shift_mm``
    (x, y; through the slice's PixelSpacing) plus ``shift_px`` native pixels, clipped to
    the image. Prediction never sets them.
    """

    instance_number: int
    x: float
    y: float
    slice_offset: int = 0
    shift_mm: tuple[float, float] = (0.0, 0.0)
    shift_px: tuple[float, float] = (0.0, 0.0)


class VolumeCropper:
    """Cut ``(n_slices, 3, S, S)`` crops from a Volume, processing each slice at most once.

    Args:
        slice_transform: whole-slice windows + CLAHE.
        crop: crop + resize of a processed slice.
        n_slices: slices per crop stack, centred on the requested instance.
        radius_scale: crop half-width in units of ``crop.size`` native pixels ...
        radius_mm: ... or in millimetres when > 0.
    """

    def __init__(self, slice_transform: SliceTransform, crop: CropResize, n_slices: int,
                 radius_scale: float, radius_mm: float = 0.0) -> None:
        self.slice_transform = slice_transform
        self.crop = crop
        self.n_slices = int(n_slices)
        self.radius_scale = float(radius_scale)
        self.radius_mm = float(radius_mm)

    def slice_plan(self, volume: Any, request: CropRequest) -> list[tuple[int, float, float, int, int]]:
        """Per output slice: (volume index, x, y, rx, ry) in that slice's own pixels.

        Raises:
            KeyError: the instance is not in the volume.
            CoordinateOutOfImage: (x, y) lies outside the labeled slice.
        """
        c = volume.index_of(int(request.instance_number))
        h, w = volume.slices[c].shape
        if not (0 <= request.x < w and 0 <= request.y < h):
            raise CoordinateOutOfImage(
                f"({request.x:.1f}, {request.y:.1f}) outside the {w}x{h} image of instance "
                f"{request.instance_number}")
        c, x, y = self._placed(volume, c, request)
        spacing_c = np.asarray(volume.pixel_spacing[c], dtype=np.float64)
        rx, ry = crop_radius_px(self.crop.size, self.radius_scale, self.radius_mm, spacing_c)
        plan = []
        for j in slice_indices(c, len(volume.slices), self.n_slices):
            j = int(j)
            same = self._same_grid(volume, c, j)
            if same:
                plan.append((j, x, y, rx, ry))
                continue
            # Different grid: same anatomy through patient coordinates, same extent in mm.
            spacing_j = np.asarray(volume.pixel_spacing[j], dtype=np.float64)
            xj, yj = map_point(x, y, volume.positions[c], spacing_c,
                               volume.positions[j], spacing_j, volume.orientation)
            rxj = max(1, round(rx * spacing_c[1] / spacing_j[1]))
            ryj = max(1, round(ry * spacing_c[0] / spacing_j[0]))
            plan.append((j, xj, yj, rxj, ryj))
        return plan

    @staticmethod
    def _same_grid(volume: Any, c: int, j: int) -> bool:
        """Whether slice j's pixels lie where slice c's do (same size, spacing, in-plane)."""
        spacing_c = np.asarray(volume.pixel_spacing[c], dtype=np.float64)
        spacing_j = np.asarray(volume.pixel_spacing[j], dtype=np.float64)
        return (volume.slices[j].shape == volume.slices[c].shape
                and np.allclose(spacing_j, spacing_c, rtol=1e-6, equal_nan=True)
                and not _shifted_in_plane(volume, c, j, spacing_c))

    def _placed(self, volume: Any, c: int, request: CropRequest) -> tuple[int, float, float]:
        """(centre slice, x, y) after the request's placement error, x and y in that slice."""
        x, y = float(request.x), float(request.y)
        if (request.slice_offset, request.shift_mm, request.shift_px) == (0, (0.0, 0.0),
                                                                         (0.0, 0.0)):
            return c, x, y
        if request.shift_mm != (0.0, 0.0):
            row_sp, col_sp = (float(v) for v in volume.pixel_spacing[c])
            if row_sp > 0 and col_sp > 0:  # NaN spacing: no mm shift can be placed
                x, y = x + request.shift_mm[0] / col_sp, y + request.shift_mm[1] / row_sp
        x, y = x + request.shift_px[0], y + request.shift_px[1]
        j = int(np.clip(c + request.slice_offset, 0, len(volume.slices) - 1))
        if j != c and not self._same_grid(volume, c, j):
            x, y = map_point(x, y, volume.positions[c], volume.pixel_spacing[c],
                             volume.positions[j], volume.pixel_spacing[j], volume.orientation)
        h, w = volume.slices[j].shape
        return j, float(np.clip(x, 0.0, w - 1.0)), float(np.clip(y, 0.0, h - 1.0))

    def process_slice(self, volume: Any, j: int) -> np.ndarray:
        """Windows + CLAHE of slice ``j`` of the volume, channel-last uint8 ``(H, W, 3)``."""
        center, width = (float(v) for v in volume.windows[j])
        return cv2.merge(list(self.slice_transform(volume.slices[j], (center, width))))

    def __call__(self, volume: Any, requests: Sequence[CropRequest]) -> list[np.ndarray | Exception]:
        """One ``(n_slices, 3, S, S)`` uint8 array per request, or the exception it raised.

        Each slice any request needs is windowed and equalised once, then every crop is cut.
        """
        processed: dict[int, np.ndarray] = {}
        out: list[np.ndarray | Exception] = []
        for request in requests:
            try:
                plan = self.slice_plan(volume, request)
            except (KeyError, CoordinateOutOfImage) as e:
                out.append(e)
                continue
            stack = np.empty((len(plan), 3, self.crop.size, self.crop.size), dtype=np.uint8)
            for i, (j, x, y, rx, ry) in enumerate(plan):
                if j not in processed:
                    processed[j] = self.process_slice(volume, j)
                stack[i] = self.crop(processed[j], x, y, rx, ry)
            out.append(stack)
        return out


def build_cropper(data_cfg: Any) -> VolumeCropper:
    """The preset :class:`VolumeCropper` for a ``DataConfig`` (the one place that reads it)."""
    fallback = PercentileWindow(*data_cfg.file_window_fallback)
    if data_cfg.window_preset == "fixed":
        first: list[ChannelWindow] = [FixedWindow(*data_cfg.soft_window),
                                      FixedWindow(*data_cfg.bone_window)]
    elif data_cfg.window_preset == "percentile":
        first = [PercentileWindow(*p) for p in data_cfg.percentile_windows[:2]]
    else:
        raise ValueError(f"unknown window_preset {data_cfg.window_preset!r}")
    channels = [*first, FileWindow(fallback)]
    # "single" (v4-v7): one intensity window, repeated so the crops stay 3-channel.
    single = data_cfg.window_channels == "single"
    windows = WindowStack([channels[0]] * 3 if single else channels)
    return VolumeCropper(
        SliceTransform(windows, Clahe(data_cfg.clahe_clip_limit, data_cfg.clahe_tile_grid)),
        CropResize(data_cfg.img_size, data_cfg.resize_interpolation),
        n_slices=data_cfg.n_slices,
        radius_scale=data_cfg.crop_radius_scale,
        radius_mm=data_cfg.crop_radius_mm,
    )
