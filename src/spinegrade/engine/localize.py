"""Locating the levels of a study with a trained localizer: one disc, one 3D position.

The order of work follows the anatomy rather than the series:

1. **Sagittal T2/STIR** decides which disc is which, with the whole spine in view
   (``models.localizer_decode.ordered_level_cells``: all disc candidates, ordered head to
   feet, labelled together, implausible chains refused by
   ``data.plausibility.disc_chain_problem``). Its five points, in patient coordinates, are
   the study's discs.
2. **Sagittal T1** looks for each foramen only near its disc: the disc is projected into the
   T1 slices through ImagePositionPatient / ImageOrientationPatient and the side's channels
   are searched within a fraction of a disc spacing of it, so T1 and T2 cannot disagree on
   the level.
3. **Axial T2**: each disc is mapped into every axial stack of the study
   (``io.geometry.locate_point``: several stacks, tilted per-disc blocks); the slice comes
   from the geometry, the axial network only refines x, y on it.

Where a study has no usable Sagittal T2 (missing, or its chain is implausible) each series
is decoded on its own (:func:`locate_series`), as are series types without a disc to start
from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spinegrade.config import LocalizerConfig, config_from_dict
from spinegrade.constants import (
    AXIAL_T2,
    LEVELS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SERIES_DESCRIPTIONS,
    is_sagittal,
)
from spinegrade.data.localizer import (
    LocalizerTask,
    PreparedSeries,
    make_task,
    prepare_series,
    slice_input,
)
from spinegrade.data.plausibility import MIN_DISC_SPACING_MM, disc_chain_problem
from spinegrade.engine.loop import resolve_device
from spinegrade.engine.run_folder import LOCALIZER, LocalizerFolder, read_checkpoint
from spinegrade.errors import UserError
from spinegrade.io.dicom import Volume
from spinegrade.io.geometry import StackGeometry, locate_point, patient_to_pixel
from spinegrade.models.localizer import HeatmapLocalizer
from spinegrade.models.localizer_decode import (
    DiscCandidate,
    Located,
    cell_to_grid,
    grid_to_cell,
    mm_per_cell,
    ordered_level_cells,
    peak_near,
    soft_argmax,
)

# The columns of locate_study's table (one row per located keypoint); ``method`` says how
# the point was found: chain (levels labelled on the whole spine), sagittal (near the
# Sagittal T2 disc), geometry (axial slice mapped from the disc) or peak (the channel's own
# maximum).
LOCATED_COLUMNS = ("study_id", "series_id", "series_description", "condition", "level_idx",
                   "level", "slice_index", "instance_number", "x", "y", "score", "method")
# Sagittal T1: a foramen is searched within this share of the mean disc spacing of its disc
# (neighbouring discs are one spacing away; the foramen sits a few mm above and behind).
FORAMEN_WINDOW = 0.45
# Axial T2: the recesses are searched within this distance of the disc's projection (they lie
# about 10-20 mm lateral and anterior-posterior of the canal centre in adults).
RECESS_WINDOW_MM = 35.0


def build_localizer(lcfg: LocalizerConfig, task: LocalizerTask, for_inference: bool = False
                    ) -> HeatmapLocalizer:
    """The heatmap network of one task, as ``localizer`` config describes it."""
    return HeatmapLocalizer(
        lcfg.backbone, in_chans=lcfg.n_context_slices + 1, num_keypoints=len(task.keypoints),
        heatmap_stride=lcfg.heatmap_stride, max_stride=lcfg.max_stride,
        decoder_channels=lcfg.decoder_channels,
        pretrained=lcfg.pretrained and not for_inference,
        pretrained_path="" if for_inference else lcfg.pretrained_path)


def shift_rows(x: np.ndarray, dy: int) -> np.ndarray:
    """``x`` (..., h, w) moved ``dy`` rows down (up when negative); zeros move in.
    ``dy = 0`` returns ``x`` itself (the one-view path copies nothing)."""
    if dy == 0:
        return x
    out = np.zeros_like(x)
    h = x.shape[-2]
    if dy >= 0:
        out[..., dy:, :] = x[..., :h - dy, :]
    else:
        out[..., :dy, :] = x[..., -dy:, :]
    return out


def shift_pixels(lcfg: LocalizerConfig, fractions: Sequence[float]) -> tuple[int, ...]:
    """Row shifts given as fractions of the image side -> pixels, whole heatmap cells."""
    s = lcfg.heatmap_stride
    return tuple(int(round(f * lcfg.img_size / s)) * s for f in fractions)


@torch.no_grad()
def heatmaps(model: HeatmapLocalizer, series: PreparedSeries, n_context: int,
             device: torch.device, batch_size: int = 16, shifts: Sequence[int] = (0,)
             ) -> torch.Tensor:
    """Sigmoid heatmaps of every slice, (n, K, h, w) float32 on the CPU.

    With several ``shifts`` (input rows, multiples of the heatmap stride): the mean over
    those framings of the input, each heatmap moved back, over the views that saw the cell.
    Framing decides which discs sit near the image edge, and with them the level evidence
    of a study the network is unsure of (``predict.localizer_shifts``).
    """
    model.eval()
    out = []
    for start in range(0, len(series), batch_size):
        x = np.stack([slice_input(series, j, n_context)
                      for j in range(start, min(start + batch_size, len(series)))])
        total, seen = 0.0, 0.0
        for dy in shifts:
            view = torch.from_numpy(shift_rows(x, dy)).to(device)
            hm = torch.sigmoid(model(view).float()).cpu().numpy()
            cells = dy // (x.shape[-2] // hm.shape[-2])
            total = total + shift_rows(hm, -cells)
            seen = seen + shift_rows(shift_rows(np.ones(hm.shape[-2:], np.float32), cells), -cells)
        out.append(torch.from_numpy((total / np.maximum(seen, 1.0)).astype(np.float32)))
    return torch.cat(out)


def chain_check(min_score: float):
    """``disc_chain_problem`` as a chain check; chains without geometry are not judged."""
    def check(points: np.ndarray, scores: np.ndarray) -> str | None:
        if not np.all(np.isfinite(points)):
            return None
        return disc_chain_problem(points, scores, min_score)
    return check


def _condition_channels(task: LocalizerTask) -> dict[str, list[int]]:
    """condition -> its heatmap channels, in level order."""
    out: dict[str, list[int]] = {}
    for k, (c, _) in enumerate(task.keypoints):
        out.setdefault(c, []).append(k)
    return out


def _refine(hm_k: np.ndarray, series: PreparedSeries, lcfg: LocalizerConfig, j: int,
            cell: tuple[int, int] | None) -> Located:
    """Soft-argmax on slice ``j`` of one channel around ``cell`` (its maximum when None)."""
    stride = lcfg.heatmap_stride
    hx, hy, peak = soft_argmax(hm_k[j], lcfg.refine_radius, at=cell)
    x, y = series.to_native(j, cell_to_grid(hx, stride), cell_to_grid(hy, stride))
    return Located(j, int(series.instance_numbers[j]), x, y, peak)


# A condition's points of one sagittal series lie on one slice or its neighbours (the
# mid-sagittal slab for the canal, one lateral slab per foramen side): this many slices on
# either side of the slab's centre.
SLAB_HALF_WIDTH = 1


def _near_cell(hm_k: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """(n,) each slice's maximum of one channel in the 3x3 cells around ``cell``."""
    r, c = cell
    return hm_k[:, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].reshape(len(hm_k), -1).max(axis=1)


def _slab_slices(hm: np.ndarray, cells: dict[int, tuple[int, int]]) -> dict[int, int]:
    """channel -> slice: the best slice of each channel within the condition's slab.

    The slab is centred on the slice where the summed scores of all the condition's levels
    at their discs are highest, so one weak level cannot drift to a lateral slice.
    """
    per_slice = sum(_near_cell(hm[:, k], cell) for k, cell in cells.items())
    centre = int(np.argmax(per_slice))
    lo, hi = max(centre - SLAB_HALF_WIDTH, 0), min(centre + SLAB_HALF_WIDTH + 1, len(hm))
    return {k: lo + int(np.argmax(_near_cell(hm[lo:hi, k], cell))) for k, cell in cells.items()}


def decode_series(hm: np.ndarray, series: PreparedSeries, lcfg: LocalizerConfig,
                  task: LocalizerTask | None = None, evidence: object = None) -> list[Located]:
    """Heatmaps (n, K, h, w) of one series -> one :class:`Located` per channel.

    Sagittal tasks (with ``lcfg.ordered_levels``) label each condition's levels on the whole
    spine first (``ordered_level_cells``); each channel then takes its best slice within the
    condition's slab (:func:`_slab_slices`). Other channels take their own maximum.
    """
    cells: dict[int, tuple[int, int]] = {}
    slices: dict[int, int] = {}
    if lcfg.ordered_levels and task is not None and is_sagittal(task.series_description):
        for chans in _condition_channels(task).values():
            found = ordered_level_cells(hm, chans, series, lcfg.heatmap_stride,
                                        MIN_DISC_SPACING_MM, chain_check(lcfg.min_score),
                                        evidence)
            if found:
                cells.update(found)
                slices.update(_slab_slices(hm, found))
    out = []
    for k in range(hm.shape[1]):
        # Without a chain: the slice where the channel peaks.
        j = slices.get(k, int(np.argmax(hm[:, k].reshape(len(series), -1).max(axis=1))))
        out.append(_refine(hm[:, k], series, lcfg, j, cells.get(k)))
    return out


def locate_series(model: HeatmapLocalizer, series: PreparedSeries, lcfg: LocalizerConfig,
                  device: torch.device, task: LocalizerTask | None = None) -> list[Located]:
    """Per keypoint channel of one series on its own: see :func:`decode_series`."""
    hm = heatmaps(model, series, lcfg.n_context_slices, device).numpy()
    return decode_series(hm, series, lcfg, task)


# --- one study -----------------------------------------------------------------------------------


@dataclass
class _Scored:
    """One series' heatmaps, computed once."""

    desc: str
    series: PreparedSeries
    task: LocalizerTask
    hm: np.ndarray


def _row(sc: _Scored, cond: str, lvl: int, loc: Located, method: str) -> dict:
    return {"study_id": sc.series.study_id, "series_id": sc.series.series_id,
            "series_description": sc.desc, "condition": cond, "level_idx": lvl,
            "level": LEVELS[lvl], "slice_index": loc.slice_index,
            "instance_number": loc.instance_number, "x": loc.x, "y": loc.y, "score": loc.score,
            "method": method}


def _own_rows(sc: _Scored, lcfg: LocalizerConfig, evidence: object = None) -> list[dict]:
    """Rows of one series decoded on its own (``evidence``: see ``ordered_level_cells``)."""
    method = "chain" if is_sagittal(sc.desc) and lcfg.ordered_levels else "peak"
    locs = decode_series(sc.hm, sc.series, lcfg, sc.task, evidence)
    return [_row(sc, c, lv, loc, method) for (c, lv), loc in
            zip(sc.task.keypoints, locs, strict=True)]


# Sagittal T1 evidence for a Sagittal T2 disc candidate: the foramina's level channels within
# this distance (mm, in the sagittal plane) of the candidate, on any slice; a foramen lies a
# few mm above and behind its disc, the neighbouring discs over 25 mm away.
T1_EVIDENCE_MM = 12.0


def t1_evidence(t1: _Scored, lcfg: LocalizerConfig):
    """Candidates -> the same with the T1 foramina's vote on which level each one is.

    One disc, one 3D position: the Sagittal T1 network's opinion of which level a disc is
    (left and right foramen channels, max near the disc) is a second, independent vote.
    It votes on the level only, not on whether the candidate is a disc: the level shares
    (scores over their sum) of both networks are averaged and scaled back by the T2 disc
    probability. (Averaging the raw scores let a T1 network that is less sure of every
    foramen halve the T2 disc evidence, and with it the cost of leaving the true L5/S1 out
    of a chain shifted up: measured on a held-out study whose T2 channels alone chose the
    right chain.)
    """
    radius = T1_EVIDENCE_MM / mm_per_cell(t1.series, t1.hm.shape[-1])
    j0 = len(t1.series) // 2
    h, w = t1.hm.shape[-2:]
    rows, cols = np.mgrid[0:h, 0:w]
    sides = list(_condition_channels(t1.task).values())

    def vote(cands: list[DiscCandidate]) -> list[DiscCandidate]:
        out = []
        for cand in cands:
            if not np.all(np.isfinite(cand.point)):
                out.append(cand)
                continue
            r0, c0 = _disc_cell(t1.series, j0, cand.point, lcfg.heatmap_stride)
            near = (rows - r0) ** 2 + (cols - c0) ** 2 <= radius**2
            if not near.any():
                out.append(cand)
                continue
            t1_levels = np.mean([t1.hm[:, chans][:, :, near].max(axis=(0, 2)) for chans in sides],
                                axis=0)
            if cand.levels.sum() <= 0 or t1_levels.sum() <= 0:
                out.append(cand)
                continue
            share = (cand.levels / cand.levels.sum() + t1_levels / t1_levels.sum()) / 2.0
            out.append(dataclasses.replace(cand, levels=cand.disc * share))
        return out

    return vote


def study_discs(t2_rows: Sequence[dict], t2: _Scored, lcfg: LocalizerConfig
                ) -> np.ndarray | None:
    """(L, 3) patient positions of the Sagittal T2 discs, or None when they are no spine."""
    pts = np.full((len(LEVELS), 3), np.nan)
    conf = np.full(len(LEVELS), np.nan)
    for r in t2_rows:
        pts[r["level_idx"]] = t2.series.patient_point(r["slice_index"], r["x"], r["y"])
        conf[r["level_idx"]] = r["score"]
    if not np.all(np.isfinite(pts)) or disc_chain_problem(pts, conf, lcfg.min_score):
        return None
    return pts


def _disc_cell(series: PreparedSeries, j: int, point: np.ndarray, stride: int
               ) -> tuple[float, float]:
    """(row, column) heatmap cell of a patient point projected into slice ``j``."""
    x, y, _ = patient_to_pixel(point, series.positions[j], series.slice_orientation(j),
                               series.pixel_spacing[j])
    gx, gy = series.to_grid(j, x, y)
    return grid_to_cell(gy, stride), grid_to_cell(gx, stride)


def _near_disc(sc: _Scored, chans: list[int], j_range: Sequence[int], point: np.ndarray,
               radius_mm: float, lcfg: LocalizerConfig) -> Located:
    """The strongest peak of ``chans`` (any level) within ``radius_mm`` of a disc, refined."""
    union = sc.hm[:, chans].max(axis=1)
    j0 = int(j_range[0])
    cell = _disc_cell(sc.series, j0, point, lcfg.heatmap_stride)
    radius = radius_mm / mm_per_cell(sc.series, sc.hm.shape[-1])
    j, r, c, _ = peak_near(union[list(j_range)], cell, radius)
    return _refine(union, sc.series, lcfg, int(j_range[j]), (r, c))


def _foramina_rows(sc: _Scored, discs: np.ndarray, lcfg: LocalizerConfig) -> list[dict]:
    """Sagittal T1: each condition's point of level k searched near disc k, on any slice."""
    gaps = np.linalg.norm(np.diff(discs, axis=0), axis=1)
    radius = FORAMEN_WINDOW * float(np.mean(gaps))
    rows = []
    for cond, chans in _condition_channels(sc.task).items():
        for chan in chans:
            lvl = sc.task.keypoints[chan][1]
            loc = _near_disc(sc, chans, range(len(sc.series)), discs[lvl], radius, lcfg)
            rows.append(_row(sc, cond, lvl, loc, "sagittal"))
    return rows


def _axial_rows(stacks: Sequence[_Scored], discs: np.ndarray, lcfg: LocalizerConfig
                ) -> list[dict]:
    """Axial T2: disc k mapped into every stack; x, y refined on the matched slice."""
    # Each slice's own orientation: the planes of tilted per-disc blocks differ by degrees,
    # millimetres at the disc.
    geoms = [StackGeometry.from_volume(s.series) for s in stacks]
    rows = []
    for lvl, point in enumerate(discs):
        match, _ = locate_point(point, geoms)
        if match is None:
            continue
        sc = stacks[match.stack]
        for cond, chans in _condition_channels(sc.task).items():
            loc = _near_disc(sc, chans, [match.slice_index], point, RECESS_WINDOW_MM, lcfg)
            rows.append(_row(sc, cond, lvl, loc, "geometry"))
    return rows


def _best_rows(rows: Iterable[dict]) -> list[dict]:
    """Per (condition, level) the row with the highest score (several series of one type)."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["condition"], r["level_idx"])
        if key not in best or r["score"] > best[key]["score"]:
            best[key] = r
    return list(best.values())


def locate_study(models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]],
                 series: Iterable[tuple[str, PreparedSeries]], lcfg: LocalizerConfig,
                 device: torch.device, shifts: Sequence[int] = (0,)) -> pd.DataFrame:
    """Locate every keypoint of every task in one study's series (see the module docstring).

    Args:
        models: task name -> (task, network).
        series: (series description, prepared series) of one study; each stack of a
            multi-stack series is its own entry.
        lcfg: localizer config.
        device: where the networks run.
        shifts: framings averaged (:func:`heatmaps`).

    Returns:
        One row per keypoint found, ``LOCATED_COLUMNS``.
    """
    by_desc = {t.series_description: (t, m) for t, m in models.values()}
    scored: dict[str, list[_Scored]] = {}
    for desc, prep in series:
        if desc in by_desc:
            task, model = by_desc[desc]
            hm = heatmaps(model, prep, lcfg.n_context_slices, device, shifts=shifts).numpy()
            scored.setdefault(desc, []).append(_Scored(desc, prep, task, hm))
    t1 = scored.get(SAGITTAL_T1, [None])[0]
    own = {desc: [_own_rows(sc, lcfg, t1_evidence(t1, lcfg)
                            if desc == SAGITTAL_T2 and t1 is not None else None)
                  for sc in items] for desc, items in scored.items()}
    discs = None
    if own.get(SAGITTAL_T2):
        k = int(np.argmax([sum(r["score"] for r in rows) for rows in own[SAGITTAL_T2]]))
        discs = study_discs(own[SAGITTAL_T2][k], scored[SAGITTAL_T2][k], lcfg)
    rows: list[dict] = []
    for desc, items in scored.items():
        if discs is not None and desc == SAGITTAL_T1:
            guided = [r for sc in items for r in _foramina_rows(sc, discs, lcfg)]
        elif discs is not None and desc == AXIAL_T2:
            guided = _axial_rows(items, discs, lcfg)
        else:
            guided = []
        found = {(r["condition"], r["level_idx"]) for r in guided}
        fallback = [r for rs in own[desc] for r in rs
                    if (r["condition"], r["level_idx"]) not in found]
        rows += _best_rows(guided) + _best_rows(fallback)
    return pd.DataFrame(rows, columns=list(LOCATED_COLUMNS))


# --- a trained run -------------------------------------------------------------------------------


@dataclass
class LocalizerRun:
    """A trained localizer run folder, ready to locate levels in new studies."""

    path: Path
    lcfg: LocalizerConfig
    models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]]
    device: torch.device
    shifts: tuple[int, ...] = (0,)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", shifts: Sequence[float] = (0.0,)
             ) -> LocalizerRun:
        """Load ``best.pt`` (else ``last.pt``) of every task in ``run_dir``; ``shifts`` are
        the framings averaged as fractions of the image side (``predict.localizer_shifts``).

        Raises:
            UserError: the folder holds no localizer checkpoint.
        """
        folder = LocalizerFolder(Path(run_dir))
        dev = resolve_device(device, "predict.device")
        models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]] = {}
        lcfg = None
        for desc in SERIES_DESCRIPTIONS:
            task = make_task(desc)
            ckpts = [folder.task(task.name).checkpoint(n) for n in ("best", "last")]
            path = next((p for p in ckpts if p.is_file()), None)
            if path is None:
                continue
            ck = read_checkpoint(path, kind=LOCALIZER, map_location=dev)
            lcfg = config_from_dict(ck.config).localizer
            task = LocalizerTask(task.name, desc, tuple((c, int(lv)) for c, lv in
                                                        ck.extra["task"]["keypoints"]))
            model = build_localizer(lcfg, task, for_inference=True).to(dev)
            model.load_state_dict(ck.model)
            models[task.name] = (task, model.eval())
        if lcfg is None:
            raise UserError(f"{folder.root}: no localizer checkpoint in any task folder; "
                            "train one with 'spinegrade train-localizer'")
        return cls(folder.root, lcfg, models, dev, shift_pixels(lcfg, shifts))

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
        return locate_study(self.models, series, self.lcfg, self.device, self.shifts)
