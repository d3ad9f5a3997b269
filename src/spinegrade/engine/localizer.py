"""Stage 1: find every disc level (which slice, and x/y on it) in a series, then crop there.

One heatmap network per series type (``CONDITION_SERIES``): Sagittal T2/STIR -> 5 spinal
keypoints, Sagittal T1 -> 10 foraminal (left, right x 5 levels), Axial T2 -> 10 subarticular.
The network sees one slice with its neighbours as channels plus a constant plane giving the
slice's position along the patient axis it is cut across (so it can tell the left foramen
from the right one, and L1/L2 from L5/S1 on axial slices). The target is a Gaussian at the
labelled point on the labelled instance and zero on the other slices. At inference every
slice is scored; per keypoint the slice with the highest peak wins and a soft-argmax around
the peak gives (x, y), mapped back to that instance's native pixels.

Run folder::

    RUN/config.yaml, RUN/split.csv, RUN/localizer_metrics.csv, RUN/problems.csv
    RUN/<task>/checkpoints/{best,last}.pt, RUN/<task>/metrics.csv,
    RUN/<task>/val_predictions.csv, RUN/<task>/overlay.png
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from spinegrade.config import Config, LocalizerConfig, config_from_dict, save_config
from spinegrade.constants import (
    CONDITION_SERIES,
    CONDITIONS,
    LEVEL_TITLE_TO_INDEX,
    LEVELS,
    SERIES_DESCRIPTIONS,
    TITLE_TO_CONDITION,
    is_sagittal,
)
from spinegrade.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path
from spinegrade.io.dicom import Volume, read_series
from spinegrade.io.geometry import pixel_to_patient
from spinegrade.models.localizer import HeatmapLocalizer
from spinegrade.problems import PROBLEMS_FILE, Problem, write_problems

_log = logging.getLogger(__name__)

# The position plane holds (slice position - stack centre) / DEPTH_SCALE_MM along the patient
# axis closest to the slice normal: about +-1 over a lumbar stack.
DEPTH_SCALE_MM = 50.0
# Fallback gap between slices when a series has no usable ImagePositionPatient.
DEFAULT_SLICE_GAP_MM = 4.0
# 3D errors are clipped here when averaged for checkpoint selection (a miss is a miss).
ERROR_CLIP_MM = 50.0


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
        orientation: (6,) ImageOrientationPatient.
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
        return pixel_to_patient(self.positions[j], self.orientation, self.pixel_spacing[j], x, y)


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


def read_coordinates(data_dir: Path, problems: list[Problem]) -> pd.DataFrame:
    """``train_label_coordinates.csv`` joined with the series descriptions.

    Returns:
        Columns study_id, series_id, instance_number, condition (column form), level_idx,
        x, y, series_description. Rows that cannot be used are listed in ``problems``.
    """
    path, spath = data_dir / "train_label_coordinates.csv", data_dir / "train_series_descriptions.csv"
    for p in (path, spath):
        if not p.is_file():
            raise UserError(f"{p} not found: --data must be an RSNA-format dataset folder")
    df = pd.read_csv(path)
    desc = pd.read_csv(spath).dropna(subset=["study_id", "series_id"])
    desc = dict(zip(desc["series_id"].astype(np.int64), desc["series_description"].astype(str),
                    strict=True))
    df["condition"] = df["condition"].map(TITLE_TO_CONDITION)
    df["level_idx"] = df["level"].map(LEVEL_TITLE_TO_INDEX)
    bad = df[["study_id", "series_id", "instance_number", "x", "y", "condition",
              "level_idx"]].isna().any(axis=1)
    for i in np.flatnonzero(bad.to_numpy()):
        problems.append(Problem.skipped(kind="bad_coordinate_row", file=path.name, row=int(i) + 1,
                                        message="missing or unknown value in a coordinate row"))
    df = df[~bad].copy()
    for col in ("study_id", "series_id", "instance_number", "level_idx"):
        df[col] = df[col].astype(np.int64)
    df["series_description"] = df["series_id"].map(desc).fillna("")
    return df[["study_id", "series_id", "instance_number", "condition", "level_idx", "x", "y",
               "series_description"]].reset_index(drop=True)


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
        lcfg: localizer config (image size, stride, sigma, context).
        augment: an :class:`Augmenter`, or None for evaluation.
    """

    def __init__(self, labelled: Sequence[SeriesLabels], samples: np.ndarray,
                 lcfg: LocalizerConfig, augment: Augmenter | None = None) -> None:
        self.labelled, self.samples, self.lcfg, self.augment = labelled, samples, lcfg, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, j = (int(v) for v in self.samples[i])
        lab = self.labelled[s]
        x = slice_input(lab.series, j, self.lcfg.n_context_slices)
        xy = lab.xy
        if self.augment is not None:
            x, xy = self.augment(x, xy, self.lcfg.n_context_slices)
        target = heatmap_target(xy, lab.slice_idx == j, self.lcfg.img_size,
                                self.lcfg.heatmap_stride, self.lcfg.heatmap_sigma)
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


def focal_heatmap_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                       ) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over the supervised channels.

    Args:
        logits: (B, K, h, w).
        target: (B, K, h, w) Gaussians, 1 at each positive cell.
        mask: (B, K) 1 for supervised channels.
    """
    logits, target = logits.float(), target.float()
    m = mask[:, :, None, None]
    pos = (target >= 1.0).float() * m
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = -(pos * (1 - p) ** 2 * log_p).sum()
    neg_loss = -((1 - pos) * m * (1 - target) ** 4 * p**2 * log_q).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


# --- model ---------------------------------------------------------------------------------------


def build_localizer(lcfg: LocalizerConfig, task: LocalizerTask, for_inference: bool = False
                    ) -> HeatmapLocalizer:
    """The heatmap network of one task, as ``localizer`` config describes it."""
    return HeatmapLocalizer(
        lcfg.backbone, in_chans=lcfg.n_context_slices + 1, num_keypoints=len(task.keypoints),
        heatmap_stride=lcfg.heatmap_stride, max_stride=lcfg.max_stride,
        decoder_channels=lcfg.decoder_channels,
        pretrained=lcfg.pretrained and not for_inference,
        pretrained_path="" if for_inference else lcfg.pretrained_path)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- inference -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """Where one keypoint was found in one series.

    Attributes:
        slice_index: position in the spatially ordered stack.
        instance_number: that slice's InstanceNumber.
        x, y: native pixel coordinates on that instance.
        score: peak height (sigmoid) on the chosen slice.
    """

    slice_index: int
    instance_number: int
    x: float
    y: float
    score: float


@torch.no_grad()
def heatmaps(model: HeatmapLocalizer, series: PreparedSeries, n_context: int,
             device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Sigmoid heatmaps of every slice, (n, K, h, w) float32 on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(series), batch_size):
        x = np.stack([slice_input(series, j, n_context)
                      for j in range(start, min(start + batch_size, len(series)))])
        out.append(torch.sigmoid(model(torch.from_numpy(x).to(device)).float()).cpu())
    return torch.cat(out)


def soft_argmax(hm: np.ndarray, radius: int, at: tuple[int, int] | None = None
                ) -> tuple[float, float, float]:
    """(x, y, peak) on one heatmap: centroid of the window of ``radius`` around a cell.

    The cell is the heatmap's maximum, or ``at = (row, column)`` when given.
    """
    h, w = hm.shape
    py, px = at if at is not None else np.unravel_index(int(np.argmax(hm)), hm.shape)
    y0, y1, x0, x1 = max(0, py - radius), min(h, py + radius + 1), max(0, px - radius), min(w, px + radius + 1)
    win = hm[y0:y1, x0:x1].astype(np.float64)
    total = win.sum()
    if total <= 0:
        return float(px), float(py), float(hm[py, px])
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return float((win * xs).sum() / total), float((win * ys).sum() / total), float(win.max())


def _disc_candidates(union: np.ndarray, min_sep: float, rel: float = 0.1) -> list[tuple[int, int]]:
    """Local maxima (row, column) of a heatmap, strongest first, at least ``min_sep`` apart."""
    dil = cv2.dilate(union.astype(np.float32), np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero((union >= dil) & (union >= rel * union.max()) & (union > 0))
    order = np.argsort(-union[ys, xs])
    kept: list[tuple[int, int]] = []
    for i in order:
        if all((ys[i] - ky) ** 2 + (xs[i] - kx) ** 2 >= min_sep**2 for ky, kx in kept):
            kept.append((int(ys[i]), int(xs[i])))
    return kept


def ordered_level_cells(hm: np.ndarray, channels: Sequence[int], series: PreparedSeries,
                        stride: int, min_sep_mm: float = 15.0) -> dict[int, tuple[int, int]] | None:
    """Assign a condition's level channels to consecutive discs along the spine.

    The peaks of all level channels (max over slices) are disc candidates; sorted from
    superior to inferior (patient z, or image rows without geometry), the levels L1/L2 ..
    L5/S1 must be consecutive candidates. The window of candidates with the highest summed
    channel scores wins, so a channel that also fires on a neighbouring disc cannot take it
    when its neighbour explains that disc better. None when there are too few candidates.
    """
    proj = hm[:, list(channels)].max(axis=0)  # (L, h, w)
    j0 = len(series) // 2
    h, w = series.shapes[j0]
    mm_per_cell = float(np.nanmean(series.pixel_spacing[j0])) * max(h, w) / hm.shape[-1]
    if not np.isfinite(mm_per_cell) or mm_per_cell <= 0:
        mm_per_cell = 1.0
    cands = _disc_candidates(proj.max(axis=0), min_sep_mm / mm_per_cell)
    if len(cands) < len(channels):
        return None

    def height(c: tuple[int, int]) -> float:
        gx, gy = c[1] * stride + (stride - 1) / 2.0, c[0] * stride + (stride - 1) / 2.0
        z = series.patient_point(j0, *series.to_native(j0, gx, gy))[2]
        return float(z) if np.isfinite(z) else -float(c[0])

    cands.sort(key=height, reverse=True)
    n = len(channels)
    sums = [sum(proj[i][cands[s + i]] for i in range(n)) for s in range(len(cands) - n + 1)]
    start = int(np.argmax(sums))
    return {k: cands[start + i] for i, k in enumerate(channels)}


def locate_series(model: HeatmapLocalizer, series: PreparedSeries, lcfg: LocalizerConfig,
                  device: torch.device, task: LocalizerTask | None = None) -> list[Located]:
    """Per keypoint channel: the slice with the highest peak and the refined (x, y) on it.

    With ``lcfg.ordered_levels`` and a sagittal ``task``, each condition's levels are first
    assigned to consecutive discs (:func:`ordered_level_cells`); (x, y) is then refined
    around the assigned disc on the channel's best slice.
    """
    hm = heatmaps(model, series, lcfg.n_context_slices, device).numpy()
    stride, r = lcfg.heatmap_stride, lcfg.refine_radius
    cells: dict[int, tuple[int, int]] = {}
    if lcfg.ordered_levels and task is not None and is_sagittal(task.series_description):
        for cond in dict.fromkeys(c for c, _ in task.keypoints):
            chans = [k for k, (c, _) in enumerate(task.keypoints) if c == cond]
            cells.update(ordered_level_cells(hm, chans, series, stride) or {})
    out = []
    for k in range(hm.shape[1]):
        # The slice is where the channel peaks: even a channel that confuses neighbouring
        # discs peaks on the right slice (the mid-sagittal one, or its side's foramina).
        j = int(np.argmax(hm[:, k].reshape(len(series), -1).max(axis=1)))
        hx, hy, peak = soft_argmax(hm[j, k], r, at=cells.get(k))
        gx, gy = hx * stride + (stride - 1) / 2.0, hy * stride + (stride - 1) / 2.0
        x, y = series.to_native(j, gx, gy)
        out.append(Located(j, int(series.instance_numbers[j]), x, y, peak))
    return out


def locate_study(models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]],
                 series: Iterable[tuple[str, PreparedSeries]], lcfg: LocalizerConfig,
                 device: torch.device) -> pd.DataFrame:
    """Locate every keypoint of every task in one study's series.

    Where a study has several series of one type (e.g. two Axial T2), each keypoint is taken
    from the series where its peak is highest.

    Args:
        models: task name -> (task, network).
        series: (series description, prepared series) of one study.
        lcfg: localizer config.
        device: where the networks run.

    Returns:
        One row per keypoint found: study_id, series_id, series_description, condition,
        level_idx, level, slice_index, instance_number, x, y, score.
    """
    best: dict[tuple[str, int], dict] = {}
    by_desc = {t.series_description: (t, m) for t, m in models.values()}
    for desc, prep in series:
        if desc not in by_desc:
            continue
        task, model = by_desc[desc]
        for (cond, lvl), loc in zip(task.keypoints, locate_series(model, prep, lcfg, device, task),
                                    strict=True):
            if (cond, lvl) not in best or loc.score > best[(cond, lvl)]["score"]:
                best[(cond, lvl)] = {
                    "study_id": prep.study_id, "series_id": prep.series_id,
                    "series_description": desc, "condition": cond, "level_idx": lvl,
                    "level": LEVELS[lvl], "slice_index": loc.slice_index,
                    "instance_number": loc.instance_number, "x": loc.x, "y": loc.y,
                    "score": loc.score}
    cols = ["study_id", "series_id", "series_description", "condition", "level_idx", "level",
            "slice_index", "instance_number", "x", "y", "score"]
    return pd.DataFrame(list(best.values()), columns=cols)


# --- evaluation ----------------------------------------------------------------------------------


def keypoint_errors(labelled: Sequence[SeriesLabels], predicted: Sequence[list[Located]],
                    task: LocalizerTask) -> pd.DataFrame:
    """Truth vs prediction for every labelled keypoint of held-out series.

    Point error is measured in the plane of the true slice (in mm, via PixelSpacing and the
    slice positions, so a neighbouring slice's prediction is compared at the same anatomy);
    ``error_3d_mm`` adds the out-of-plane distance; ``slice_error`` counts stack positions.
    """
    rows = []
    for lab, locs in zip(labelled, predicted, strict=True):
        s = lab.series
        for k in np.flatnonzero(lab.mask):
            tj, loc = int(lab.slice_idx[k]), locs[k]
            tx, ty = s.to_native(tj, *lab.xy[k])
            p_true, p_pred = s.patient_point(tj, tx, ty), s.patient_point(loc.slice_index, loc.x, loc.y)
            d = p_pred - p_true
            if np.all(np.isfinite(d)):
                normal = np.cross(s.orientation[:3], s.orientation[3:6])
                in_plane = float(np.linalg.norm(d - (d @ normal) * normal))
                err3d = float(np.linalg.norm(d))
            else:  # no geometry: compare pixels on the true slice's spacing
                sp = s.pixel_spacing[tj]
                in_plane = err3d = float(math.hypot((loc.x - tx) * sp[1], (loc.y - ty) * sp[0]))
            cond, lvl = task.keypoints[k]
            rows.append({"study_id": s.study_id, "series_id": s.series_id, "condition": cond,
                         "level": LEVELS[lvl], "true_instance": int(s.instance_numbers[tj]),
                         "pred_instance": loc.instance_number, "true_x": tx, "true_y": ty,
                         "pred_x": loc.x, "pred_y": loc.y, "score": loc.score,
                         "slice_error": loc.slice_index - tj, "error_mm": in_plane,
                         "error_3d_mm": err3d})
    return pd.DataFrame(rows)


def summarize_errors(errors: pd.DataFrame, by: Sequence[str] = ("condition", "level")
                     ) -> pd.DataFrame:
    """Median and 90th-percentile point error (mm) and slice accuracy, per group and overall."""

    def stats(g: pd.DataFrame) -> dict:
        se = g["slice_error"].abs()
        return {"n": len(g), "median_mm": float(g["error_mm"].median()),
                "p90_mm": float(g["error_mm"].quantile(0.9)),
                "slice_exact": float((se == 0).mean()), "slice_within1": float((se <= 1).mean())}

    if errors.empty:
        return pd.DataFrame(columns=[*by, "n", "median_mm", "p90_mm", "slice_exact",
                                     "slice_within1"])
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), **stats(g)}
            for key, g in errors.groupby(list(by), sort=False)]
    rows.append({**{b: "all" for b in by}, **stats(errors)})
    return pd.DataFrame(rows)


# --- reading the training series -----------------------------------------------------------------


def load_task_series(data_dir: Path, task: LocalizerTask, coords: pd.DataFrame,
                     lcfg: LocalizerConfig, problems: list[Problem], progress: bool = False
                     ) -> list[SeriesLabels]:
    """Read, normalise and label every series of ``task``'s type that carries its labels."""
    from tqdm import tqdm

    rows = coords[coords["series_description"] == task.series_description]
    rows = rows[[(c, lv) in task.keypoints for c, lv in zip(rows["condition"], rows["level_idx"],
                                                              strict=True)]]
    groups = list(rows.groupby(["study_id", "series_id"], sort=True))
    out = []
    for (study, series_id), g in tqdm(groups, desc=f"read {task.name}", disable=not progress,
                                      leave=False):
        folder = data_dir / "train_images" / str(study) / str(series_id)
        try:
            vol = read_series(folder, g["instance_number"].tolist())
            prep = prepare_series(vol, study, series_id, lcfg.img_size, lcfg.intensity_percentiles)
        except (UserError, OSError, ValueError) as e:
            problems.append(Problem.skipped(kind="unreadable_series", study_id=int(study),
                                            series_id=int(series_id), file=str(folder),
                                            message=str(e)))
            continue
        lab = label_series(prep, g, task, problems)
        if lab.mask.any():
            out.append(lab)
    return out


def split_studies(study_ids: Iterable[int], val_fraction: float, seed: int) -> pd.DataFrame:
    """Hold out ``val_fraction`` of the studies (at least one when there are two or more)."""
    ids = np.array(sorted({int(s) for s in study_ids}), dtype=np.int64)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    perm = np.random.default_rng(seed).permutation(len(ids))
    split = np.full(len(ids), "train", dtype=object)
    split[perm[:n_val]] = "val"
    return pd.DataFrame({"study_id": ids, "split": split})


# --- training ------------------------------------------------------------------------------------


def train_one_epoch(model: HeatmapLocalizer, loader: Iterable[dict],
                    optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """One pass over the loader; returns the mean loss per batch."""
    model.train()
    total, n = 0.0, 0
    for batch in loader:
        logits = model(batch["image"].to(device))
        loss = focal_heatmap_loss(logits, batch["heatmap"].to(device), batch["mask"].to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError("localizer loss is not finite; lower localizer.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        total, n = total + float(loss.detach()), n + 1
    return total / max(n, 1)


def evaluate(model: HeatmapLocalizer, labelled: Sequence[SeriesLabels], task: LocalizerTask,
             lcfg: LocalizerConfig, device: torch.device) -> pd.DataFrame:
    """Locate every keypoint of the held-out series; errors per labelled keypoint."""
    preds = [locate_series(model, lab.series, lcfg, device, task) for lab in labelled]
    return keypoint_errors(labelled, preds, task)


def selection_score(errors: pd.DataFrame) -> float:
    """Mean 3D error with misses clipped (lower is better): slice and point error in one."""
    if errors.empty:
        return float("inf")
    return float(errors["error_3d_mm"].clip(upper=ERROR_CLIP_MM).mean())


@dataclass
class _TaskRun:
    task: LocalizerTask
    cfg: Config
    out: Path
    model: HeatmapLocalizer
    optimizer: torch.optim.Optimizer
    device: torch.device
    history: list[dict]
    best: float = float("inf")
    start_epoch: int = 1


def _lr(lcfg: LocalizerConfig, epoch: int) -> float:
    """Cosine from ``lr`` (epoch 1) to ``min_lr`` (last epoch)."""
    t = (epoch - 1) / max(lcfg.epochs - 1, 1)
    return lcfg.min_lr + 0.5 * (lcfg.lr - lcfg.min_lr) * (1 + math.cos(math.pi * t))


def _setup_task(cfg: Config, task: LocalizerTask, out: Path, resume: bool) -> _TaskRun:
    lcfg = cfg.localizer
    device = resolve_device(lcfg.device)
    torch.manual_seed(lcfg.seed)
    model = build_localizer(lcfg, task).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lcfg.lr, weight_decay=lcfg.weight_decay)
    run = _TaskRun(task, cfg, out, model, optimizer, device, [])
    last = out / "checkpoints" / "last.pt"
    if resume and last.is_file():
        ck = load_checkpoint(last, map_location=device)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        run.history, run.best = list(ck["history"]), float(ck["best"])
        run.start_epoch = int(ck["epoch"]) + 1
        _log.info("%s: resuming after epoch %d", task.name, ck["epoch"])
    return run


def save_localizer_checkpoint(path: Path, cfg: Config, task: LocalizerTask,
                              model: HeatmapLocalizer, epoch: int, **extra: object) -> Path:
    """Write a self-describing localizer checkpoint (config, task, weights) atomically."""
    from spinegrade.config import config_to_dict

    return save_checkpoint(path, {
        "config": config_to_dict(cfg), "epoch": epoch, "kind": "localizer",
        "task": {"name": task.name, "series_description": task.series_description,
                 "keypoints": [[c, lv] for c, lv in task.keypoints]},
        "model": model.state_dict(), **extra})


def _save(run: _TaskRun, epoch: int, improved: bool) -> None:
    ckpts = run.out / "checkpoints"
    if improved:
        save_localizer_checkpoint(ckpts / "best.pt", run.cfg, run.task, run.model, epoch,
                                  score=run.best)
    save_localizer_checkpoint(ckpts / "last.pt", run.cfg, run.task, run.model, epoch,
                              optimizer=run.optimizer.state_dict(), rng=rng_state(),
                              history=run.history, best=run.best)
    with atomic_path(run.out / "metrics.csv") as tmp:
        pd.DataFrame(run.history).to_csv(tmp, index=False)


def fit_task(cfg: Config, task: LocalizerTask, train: Sequence[SeriesLabels],
             val: Sequence[SeriesLabels], out: Path, resume: bool = True) -> pd.DataFrame:
    """Train one task's network; keep the checkpoint with the best held-out score.

    Returns:
        Held-out keypoint errors of the best checkpoint (see :func:`keypoint_errors`).
    """
    lcfg = cfg.localizer
    run = _setup_task(cfg, task, out, resume)
    for epoch in range(run.start_epoch, lcfg.epochs + 1):
        start = time.perf_counter()
        rng = np.random.default_rng([lcfg.seed, epoch])  # per epoch: resuming needs no state
        samples = training_samples(train, lcfg.neighbour_radius, lcfg.random_negatives, rng)
        aug = (Augmenter(lcfg.aug_rotate_deg, lcfg.aug_scale, lcfg.aug_shift, rng)
               if lcfg.augment else None)
        loader = torch.utils.data.DataLoader(
            LocalizerDataset(train, samples, lcfg, aug), batch_size=lcfg.batch_size,
            shuffle=True, generator=torch.Generator().manual_seed(lcfg.seed * 1000 + epoch))
        for group in run.optimizer.param_groups:
            group["lr"] = _lr(lcfg, epoch)
        loss = train_one_epoch(run.model, loader, run.optimizer, run.device)
        errors = evaluate(run.model, val, task, lcfg, run.device) if val else pd.DataFrame()
        score = selection_score(errors)
        improved = score < run.best or not val
        run.best = min(run.best, score)
        overall = summarize_errors(errors).iloc[-1] if not errors.empty else {}
        # Plain Python numbers only: last.pt must load with weights_only=True.
        run.history.append({"epoch": epoch, "lr": _lr(lcfg, epoch), "train_loss": float(loss),
                            "val_score_mm": float(score),
                            "val_median_mm": float(overall.get("median_mm", math.nan)),
                            "val_slice_within1": float(overall.get("slice_within1", math.nan)),
                            "samples": len(samples), "seconds": time.perf_counter() - start})
        _save(run, epoch, improved)
        _log.info("%s epoch %d/%d: loss %.4f, held-out 3D error %.2f mm, median %.2f mm, "
                  "+-1 slice %.3f (%.0f s)", task.name, epoch, lcfg.epochs, loss, score,
                  overall.get("median_mm", float("nan")),
                  overall.get("slice_within1", float("nan")), time.perf_counter() - start)
    best = load_checkpoint(out / "checkpoints" / "best.pt", map_location=run.device)
    run.model.load_state_dict(best["model"])
    return evaluate(run.model, val, task, lcfg, run.device) if val else pd.DataFrame()


def train_localizer(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = True,
                    progress: bool = True) -> pd.DataFrame:
    """Train and evaluate one localizer per configured series type.

    Args:
        cfg: the whole config; only ``localizer`` is read.
        data_dir: RSNA-format training data.
        out_dir: run folder (see the module docstring).
        resume: continue from ``last.pt`` where a task has one.
        progress: show progress bars.

    Returns:
        The held-out summary table (task, condition, level, n, median_mm, p90_mm,
        slice_exact, slice_within1), also written to ``localizer_metrics.csv``.
    """
    from spinegrade.report.localizer import plot_overlay

    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    problems: list[Problem] = []
    coords = read_coordinates(data_dir, problems)
    split = split_studies(coords["study_id"], cfg.localizer.val_fraction, cfg.localizer.seed)
    with atomic_path(out / "split.csv") as tmp:
        split.to_csv(tmp, index=False)
    val_ids = set(split.loc[split["split"] == "val", "study_id"])
    tables = []
    for desc in cfg.localizer.series:
        task = make_task(desc)
        labelled = load_task_series(data_dir, task, coords, cfg.localizer, problems, progress)
        if not labelled:
            _log.warning("%s: no readable labelled series; skipped", task.name)
            continue
        train = [lab for lab in labelled if lab.series.study_id not in val_ids]
        val = [lab for lab in labelled if lab.series.study_id in val_ids]
        _log.info("%s: %d training series, %d held-out", task.name, len(train), len(val))
        errors = fit_task(cfg, task, train, val, out / task.name, resume)
        if errors.empty:
            continue
        with atomic_path(out / task.name / "val_predictions.csv") as tmp:
            errors.to_csv(tmp, index=False)
        plot_overlay(val, errors, task, out / task.name / "overlay.png")
        tables.append(summarize_errors(errors).assign(task=task.name))
    write_problems(out / PROBLEMS_FILE, problems)
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    table = table[["task", *[c for c in table.columns if c != "task"]]]
    with atomic_path(out / "localizer_metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


# --- loading a trained localizer -----------------------------------------------------------------


@dataclass
class LocalizerRun:
    """A trained localizer run folder, ready to locate levels in new studies."""

    path: Path
    lcfg: LocalizerConfig
    models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]]
    device: torch.device

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto") -> LocalizerRun:
        """Load ``best.pt`` (else ``last.pt``) of every task in ``run_dir``.

        Raises:
            UserError: the folder holds no localizer checkpoint.
        """
        run = Path(run_dir)
        dev = resolve_device(device)
        models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]] = {}
        lcfg = None
        for desc in SERIES_DESCRIPTIONS:
            task = make_task(desc)
            ckpts = [run / task.name / "checkpoints" / f"{n}.pt" for n in ("best", "last")]
            path = next((p for p in ckpts if p.is_file()), None)
            if path is None:
                continue
            ck = load_checkpoint(path, map_location=dev)
            if ck.get("kind") != "localizer":
                raise UserError(f"{path}: not a localizer checkpoint")
            lcfg = config_from_dict(ck["config"]).localizer
            task = LocalizerTask(task.name, desc, tuple((c, int(lv)) for c, lv in ck["task"]["keypoints"]))
            model = build_localizer(lcfg, task, for_inference=True).to(dev)
            model.load_state_dict(ck["model"])
            models[task.name] = (task, model.eval())
        if lcfg is None:
            raise UserError(f"{run}: no localizer checkpoint (<task>/checkpoints/best.pt); "
                            "train one with 'spinegrade train-localizer'")
        return cls(run, lcfg, models, dev)

    @property
    def series_descriptions(self) -> tuple[str, ...]:
        """The series types this run can localise."""
        return tuple(t.series_description for t, _ in self.models.values())

    def prepare(self, volume: Volume, study_id: int, series_id: int) -> PreparedSeries:
        """A Volume normalised and resized as this run's networks expect."""
        return prepare_series(volume, study_id, series_id, self.lcfg.img_size,
                              self.lcfg.intensity_percentiles)

    def locate(self, series: Iterable[tuple[str, PreparedSeries]]) -> pd.DataFrame:
        """See :func:`locate_study`."""
        return locate_study(self.models, series, self.lcfg, self.device)
