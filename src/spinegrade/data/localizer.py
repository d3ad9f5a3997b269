"""The localizer's data: series prepared for the heatmap network, targets and the dataset.

A series becomes a :class:`PreparedSeries` (slices resized to one square grid and normalised
by the series' own intensity percentiles, plus the geometry to map grid pixels back to
native pixels and patient millimetres). :func:`label_series` attaches the coordinate rows of
``train_label_coordinates.csv`` to it as per-channel targets; :class:`LocalizerDataset`
turns (series, slice) samples into network inputs and Gaussian heatmaps. Nothing here reads
a ``Config``: the engine passes the settings explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spinegrade.constants import CONDITION_SERIES, CONDITIONS, LEVELS, SERIES_DESCRIPTIONS
from spinegrade.data.rsna import series_folder
from spinegrade.errors import UserError
from spinegrade.io.dicom import Volume, read_stacks
from spinegrade.io.geometry import pixel_to_patient
from spinegrade.problems import Problem

# The position plane holds (slice position - stack centre) / DEPTH_SCALE_MM along the patient
# axis closest to the slice normal: about +-1 over a lumbar stack.
DEPTH_SCALE_MM = 50.0
# Fallback gap between slices when a series has no usable ImagePositionPatient.
DEFAULT_SLICE_GAP_MM = 4.0

# --- tasks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalizerTask:
    """One series type and the keypoints located on it.

    Attributes:
        name: folder-safe name, e.g. ``sagittal_t2_stir``.
        series_description: e.g. ``Sagittal T2/STIR``.
        keypoints: ``(condition, level index)`` per heatmap channel.
    """

    name: str
    series_description: str
    keypoints: tuple[tuple[str, int], ...]

    def channel(self, condition: str, level_idx: int) -> int:
        """Heatmap channel of one (condition, level)."""
        return self.keypoints.index((condition, level_idx))


def task_name(series_description: str) -> str:
    """``Sagittal T2/STIR`` -> ``sagittal_t2_stir``."""
    return series_description.lower().replace("/", "_").replace(" ", "_")


def make_task(series_description: str) -> LocalizerTask:
    """The task of one series type; its keypoints follow ``CONDITION_SERIES``."""
    if series_description not in SERIES_DESCRIPTIONS:
        raise UserError(f"localizer.series: '{series_description}' is not one of "
                        f"{', '.join(SERIES_DESCRIPTIONS)}")
    kps = tuple((c, i) for c in CONDITIONS if CONDITION_SERIES[c] == series_description
                for i in range(len(LEVELS)))
    if not kps:
        raise UserError(f"localizer.series: no condition is labelled on '{series_description}'")
    return LocalizerTask(task_name(series_description), series_description, kps)


# --- series -> network input ---------------------------------------------------------------------


@dataclass
class PreparedSeries:
    """A series resized to a square grid and normalised, plus the geometry to map back.

    Attributes:
        study_id, series_id: identifiers.
        images: (n, S, S) uint8, per-series percentile window, spatial order.
        depth: (n,) position plane values.
        instance_numbers: (n,) int.
        shapes: (n, 2) native (rows, columns).
        positions: (n, 3) ImagePositionPatient (NaN without geometry).
        pixel_spacing: (n, 2) (row, column) spacing in mm (NaN where absent).
        orientation: (6,) ImageOrientationPatient shared by the stack.
        orientations: (n, 6) each slice's own orientation (tilted per-disc blocks), or None.
    """

    study_id: int
    series_id: int
    images: np.ndarray
    depth: np.ndarray
    instance_numbers: np.ndarray
    shapes: np.ndarray
    positions: np.ndarray
    pixel_spacing: np.ndarray
    orientation: np.ndarray
    orientations: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.instance_numbers)

    def to_grid(self, j: int, x: float, y: float) -> tuple[float, float]:
        """Native pixel (x, y) of slice ``j`` -> pixel of the S x S grid (pixel centres)."""
        size = self.images.shape[-1]
        h, w = self.shapes[j]
        return (x + 0.5) * size / w - 0.5, (y + 0.5) * size / h - 0.5

    def to_native(self, j: int, gx: float, gy: float) -> tuple[float, float]:
        """Inverse of :meth:`to_grid`."""
        size = self.images.shape[-1]
        h, w = self.shapes[j]
        return (gx + 0.5) * w / size - 0.5, (gy + 0.5) * h / size - 0.5

    def patient_point(self, j: int, x: float, y: float) -> np.ndarray:
        """Patient coordinates (mm) of native pixel (x, y) on slice ``j``; NaN without geometry."""
        return pixel_to_patient(self.positions[j], self.slice_orientation(j),
                                self.pixel_spacing[j], x, y)

    def slice_orientation(self, j: int) -> np.ndarray:
        """(6,) ImageOrientationPatient of slice ``j`` (its own where known)."""
        return self.orientation if self.orientations is None else self.orientations[j]


def _depth(volume: Volume) -> np.ndarray:
    """Position plane values: slice position along its dominant patient axis, centred."""
    n = len(volume.instance_numbers)
    pos = np.asarray(volume.positions, dtype=np.float64)
    normal = np.asarray(volume.normal, dtype=np.float64)
    if pos.shape == (n, 3) and np.all(np.isfinite(pos)) and np.all(np.isfinite(normal)):
        # The patient axis (not the normal's sign) fixes the direction: +x is always the
        # patient's left, +z superior, whichever way the scanner ordered the stack.
        d = pos[:, int(np.argmax(np.abs(normal)))]
    else:
        d = np.arange(n) * DEFAULT_SLICE_GAP_MM
    return ((d - np.median(d)) / DEPTH_SCALE_MM).astype(np.float32)


def prepare_series(volume: Volume, study_id: int, series_id: int, img_size: int,
                   percentiles: Sequence[float]) -> PreparedSeries:
    """Normalise a Volume by its own intensity percentiles and resize every slice.

    Args:
        volume: a series read with pixels.
        study_id, series_id: identifiers carried along.
        img_size: side S of the square network grid.
        percentiles: (low, high) percentiles of the whole series mapped to 0 and 255.
    """
    if not volume.slices:
        raise ValueError(f"{volume.path}: read without pixels")
    sample = np.concatenate([s[::4, ::4].ravel() for s in volume.slices])
    lo, hi = np.percentile(sample, percentiles)
    hi = hi if hi > lo else lo + 1.0
    images = np.empty((len(volume.slices), img_size, img_size), dtype=np.uint8)
    for j, s in enumerate(volume.slices):
        v = np.clip((s.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255)
        images[j] = np.rint(cv2.resize(v, (img_size, img_size), interpolation=cv2.INTER_AREA))
    return PreparedSeries(
        study_id=int(study_id), series_id=int(series_id), images=images, depth=_depth(volume),
        instance_numbers=np.asarray(volume.instance_numbers, dtype=np.int64),
        shapes=np.array([s.shape for s in volume.slices], dtype=np.int64),
        positions=np.asarray(volume.positions, dtype=np.float64),
        pixel_spacing=np.asarray(volume.pixel_spacing, dtype=np.float64),
        orientation=np.asarray(volume.orientation, dtype=np.float64),
        orientations=(None if getattr(volume, "orientations", None) is None
                      else np.asarray(volume.orientations, dtype=np.float64)),
    )


def slice_input(series: PreparedSeries, j: int, n_context: int) -> np.ndarray:
    """Network input of slice ``j``: ``n_context`` neighbouring slices + the position plane.

    Returns:
        (n_context + 1, S, S) float32 in [0, 1] for the images; the plane may exceed it.
    """
    offsets = np.arange(n_context) - n_context // 2
    idx = np.clip(j + offsets, 0, len(series) - 1)
    imgs = series.images[idx].astype(np.float32) / 255.0
    plane = np.full((1, *imgs.shape[1:]), series.depth[j], dtype=np.float32)
    return np.concatenate([imgs, plane])


# --- labels and training samples -----------------------------------------------------------------


@dataclass
class SeriesLabels:
    """A prepared series with its labelled keypoints (slice index, grid x, grid y) per channel.

    ``mask[k]`` is False where keypoint ``k`` is labelled on another series of the study (or
    not at all): that channel is then not supervised on this series.
    """

    series: PreparedSeries
    slice_idx: np.ndarray   # (K,) int, -1 where not labelled here
    xy: np.ndarray          # (K, 2) grid coordinates
    mask: np.ndarray        # (K,) bool


def label_series(series: PreparedSeries, rows: pd.DataFrame, task: LocalizerTask,
                 problems: list[Problem]) -> SeriesLabels:
    """Attach a series' coordinate rows to it as per-channel training targets."""
    k = len(task.keypoints)
    slice_idx, xy = np.full(k, -1, dtype=np.int64), np.zeros((k, 2), dtype=np.float32)
    for r in rows.itertuples():
        if (r.condition, r.level_idx) not in task.keypoints:
            continue
        c = task.channel(r.condition, r.level_idx)
        hits = np.flatnonzero(series.instance_numbers == r.instance_number)
        if hits.size == 0:
            problems.append(Problem.skipped(
                kind="missing_instance", study_id=series.study_id, series_id=series.series_id,
                message=f"labelled instance {r.instance_number} not read"))
            continue
        slice_idx[c] = hits[0]
        xy[c] = series.to_grid(int(hits[0]), float(r.x), float(r.y))
    # Labelled on another series of the study, or nowhere: unknown here, not "absent".
    return SeriesLabels(series, slice_idx, xy, slice_idx >= 0)


def heatmap_target(xy: np.ndarray, present: np.ndarray, size: int, stride: int,
                   sigma: float) -> np.ndarray:
    """Gaussian heatmaps (K, size/stride, size/stride); the nearest cell to each point is 1.

    Args:
        xy: (K, 2) points on the S x S grid.
        present: (K,) which channels carry a point; the others are all zero.
        size: S.
        stride: heatmap stride.
        sigma: Gaussian sigma in heatmap cells.
    """
    h = size // stride
    out = np.zeros((len(xy), h, h), dtype=np.float32)
    grid = np.arange(h, dtype=np.float32)
    for k in np.flatnonzero(present):
        cx, cy = (xy[k] - (stride - 1) / 2.0) / stride
        if not (-0.5 <= cx < h - 0.5 and -0.5 <= cy < h - 0.5):
            continue
        g = np.exp(-((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) / (2 * sigma**2))
        g[int(round(cy)), int(round(cx))] = 1.0  # the positive cell of the focal loss
        out[k] = g
    return out


class Augmenter:
    """Random affine (rotation, scale, shift) and gamma of one sample, points moved along.

    Args:
        rotate_deg: maximum rotation.
        scale: (low, high) zoom factors.
        shift: maximum shift as a fraction of the image side.
        rng: random generator.
    """

    def __init__(self, rotate_deg: float, scale: Sequence[float], shift: float,
                 rng: np.random.Generator) -> None:
        self.rotate_deg, self.scale, self.shift, self.rng = rotate_deg, tuple(scale), shift, rng

    def __call__(self, x: np.ndarray, xy: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
        size = x.shape[-1]
        r = self.rng
        m = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2),
                                    r.uniform(-self.rotate_deg, self.rotate_deg),
                                    r.uniform(*self.scale))
        m[:, 2] += r.uniform(-self.shift, self.shift, 2) * size
        imgs = np.ascontiguousarray(x[:n_images].transpose(1, 2, 0))
        imgs = cv2.warpAffine(imgs, m, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        imgs = imgs.reshape(size, size, n_images).transpose(2, 0, 1)
        imgs = np.clip(imgs, 0, 1) ** np.float32(math.exp(r.uniform(-0.25, 0.25)))
        out = x.copy()
        out[:n_images] = imgs
        return out, (xy @ m[:, :2].T + m[:, 2]).astype(np.float32)


class LocalizerDataset(torch.utils.data.Dataset):
    """(series, slice) samples -> dict(image, heatmap, mask).

    Args:
        labelled: the series with their targets.
        samples: (series index, slice index) pairs.
        n_context: neighbouring slices per input (``localizer.n_context_slices``).
        img_size: side S of the network grid.
        stride: heatmap stride.
        sigma: Gaussian sigma in heatmap cells.
        augment: an :class:`Augmenter`, or None for evaluation.
    """

    def __init__(self, labelled: Sequence[SeriesLabels], samples: np.ndarray, *, n_context: int,
                 img_size: int, stride: int, sigma: float, augment: Augmenter | None = None
                 ) -> None:
        self.labelled, self.samples, self.augment = labelled, samples, augment
        self.n_context, self.img_size, self.stride, self.sigma = n_context, img_size, stride, sigma

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, j = (int(v) for v in self.samples[i])
        lab = self.labelled[s]
        x = slice_input(lab.series, j, self.n_context)
        xy = lab.xy
        if self.augment is not None:
            x, xy = self.augment(x, xy, self.n_context)
        target = heatmap_target(xy, lab.slice_idx == j, self.img_size, self.stride, self.sigma)
        return {"image": torch.from_numpy(x), "heatmap": torch.from_numpy(target),
                "mask": torch.from_numpy(lab.mask.astype(np.float32))}


def training_samples(labelled: Sequence[SeriesLabels], radius: int, n_random: int,
                     rng: np.random.Generator | None) -> np.ndarray:
    """(series, slice) pairs: labelled slices +- ``radius``, plus random other slices.

    With ``rng=None`` every slice of every series is returned (for evaluation).
    """
    pairs = []
    for s, lab in enumerate(labelled):
        n = len(lab.series)
        if rng is None:
            pairs += [(s, j) for j in range(n)]
            continue
        near = {int(j + d) for j in lab.slice_idx[lab.slice_idx >= 0]
                for d in range(-radius, radius + 1) if 0 <= j + d < n}
        rest = np.setdiff1d(np.arange(n), sorted(near))
        extra = rng.choice(rest, size=min(n_random, rest.size), replace=False) if rest.size else []
        pairs += [(s, j) for j in sorted(near | {int(e) for e in extra})]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def load_task_series(data_dir: Path, task: LocalizerTask, coords: pd.DataFrame, img_size: int,
                     percentiles: Sequence[float], problems: list[Problem], progress: bool = False
                     ) -> list[SeriesLabels]:
    """Read, normalise and label every series of ``task``'s type that carries its labels.

    Args:
        data_dir: RSNA-format training data.
        task: the series type and its keypoints.
        coords: coordinate rows with a ``series_description`` column.
        img_size, percentiles: as for :func:`prepare_series`.
        problems: unreadable series and missing instances are appended here.
        progress: show a progress bar.
    """
    rows = coords[coords["series_description"] == task.series_description]
    rows = rows[[(c, lv) in task.keypoints for c, lv in zip(rows["condition"], rows["level_idx"],
                                                              strict=True)]]
    groups = list(rows.groupby(["study_id", "series_id"], sort=True))
    out = []
    for (study, series_id), g in tqdm(groups, desc=f"read {task.name}", disable=not progress,
                                      leave=False):
        folder = series_folder(data_dir, study, series_id)
        try:
            # Every stack: the labels of a series of tilted per-disc blocks span them all.
            stacks = read_stacks(folder)
            preps = [prepare_series(v, study, series_id, img_size, percentiles) for v in stacks]
        except (UserError, OSError, ValueError) as e:
            problems.append(Problem.skipped(kind="unreadable_series", study_id=int(study),
                                            series_id=int(series_id), file=str(folder),
                                            message=str(e)))
            continue
        for prep in preps:
            rows = g[g["instance_number"].isin(prep.instance_numbers)]
            lab = label_series(prep, rows, task, problems)
            if lab.mask.any():
                out.append(lab)
        read = set().union(*(p.instance_numbers.tolist() for p in preps))
        for inst in sorted(set(g["instance_number"]) - read):
            problems.append(Problem.skipped(
                kind="missing_instance", study_id=int(study), series_id=int(series_id),
                message=f"labelled instance {inst} not read"))
    return out
