"""One synthetic study: grades, anatomy, three series rendered to DICOM, label coordinates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinegrade.constants import (
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    LEVEL_TITLES,
    NUM_LEVELS,
    SERIES_DESCRIPTIONS,
)
from spinegrade.data.synthetic import anatomy as A
from spinegrade.data.synthetic import geometry as G
from spinegrade.data.synthetic import labels as L
from spinegrade.data.synthetic.dicom_writer import sample_encoding, write_instance
from spinegrade.data.synthetic.render import render_slice, sample_appearance

SAG_T1, SAG_T2, AXIAL_T2 = SERIES_DESCRIPTIONS


@dataclass(frozen=True)
class SynthOptions:
    """Knobs of the generator beyond size, seed and class balance.

    Attributes:
        max_matrix: cap on image rows/columns (pixel spacing grows to keep the field of
            view); None keeps the realistic 256-640 range. Small values make fast tests.
        labels_only: compute geometry and labels but write no DICOM files (fast statistics).
        p_missing_series: chance that a study lacks one of its three series.
        p_monochrome1: chance that a series is stored MONOCHROME1 (inverted).
        p_odd_order: chance that a series' instance numbers are shuffled (twice that:
            reversed), and scale of the chance that they skip numbers.
        p_axial_per_level: chance that Axial T2 is short stacks tilted along each disc
            (different orientations in one series) rather than one stack.
        p_stir: chance that the Sagittal T2/STIR series is a STIR (fat suppressed).
        empty_scale: multiplies the (realistic) chance of empty label cells; 0 disables.
        difficulty: ``easy`` (default; the demo's data) | ``realistic`` | ``hard``: how much
            the grades' anatomy overlaps and how noisy the labels are (``labels.DIFFICULTIES``).
    """

    max_matrix: int | None = None
    labels_only: bool = False
    p_missing_series: float = 0.015
    p_monochrome1: float = 0.05
    p_odd_order: float = 0.1
    p_axial_per_level: float = 0.7
    p_stir: float = 0.2
    empty_scale: float = 1.0
    difficulty: str = "easy"


@dataclass(frozen=True)
class StudyTask:
    """Everything needed to make one study in a worker process."""

    index: int
    seed: int
    study_id: int
    series_ids: tuple[int, int, int]  # Sagittal T1, Sagittal T2/STIR, Axial T2
    images_dir: Path  # train_images or test_images
    balance: dict[str, np.ndarray]
    options: SynthOptions


@dataclass
class StudyResult:
    """What the CSVs and the summary need from one study."""

    study_id: int
    grades: np.ndarray  # (conditions, levels), L.EMPTY where unlabelled
    latent: np.ndarray
    n_relabelled: int = 0  # labelled cells whose grade the reader noise changed
    series_rows: list[tuple[int, int, str]] = field(default_factory=list)
    coord_rows: list[tuple] = field(default_factory=list)
    series_info: dict[int, dict] = field(default_factory=dict)
    n_images: int = 0


def _build_series(rng: np.random.Generator, an: A.Anatomy, opt: SynthOptions) -> dict:
    """Geometry of the study's series, keyed by description; missing ones left out."""
    missing = None
    if rng.random() < opt.p_missing_series:
        missing = SERIES_DESCRIPTIONS[int(rng.integers(len(SERIES_DESCRIPTIONS)))]
    out = {}
    for desc in SERIES_DESCRIPTIONS:
        if desc == AXIAL_T2:
            per_level = bool(rng.random() < opt.p_axial_per_level)
            geom = G.axial_series(rng, an, desc, opt.max_matrix, per_level)
        else:
            geom = G.sagittal_series(rng, an, desc, opt.max_matrix)
        G.number_instances(rng, geom, opt.p_odd_order)
        if desc != missing:
            out[desc] = geom
    return out


def _label_slice(series: G.SeriesGeom, cond: int, level: int, targets: dict) -> tuple[int, np.ndarray]:
    """Index of the labelled slice and the 3D point clicked on it."""
    if series.description == AXIAL_T2:
        stacks = {s.stack for s in series.slices}
        stack = level if len(stacks) > 1 else None
        # The axial slice through the disc is the one nearest the canal centre at that disc.
        return series.nearest(targets[A.SPINAL], stack), targets[cond]
    return series.nearest(targets[cond]), targets[cond]


def _coordinates(study_id: int, series_ids: dict, geoms: dict, an: A.Anatomy,
                 grades: np.ndarray) -> list[tuple]:
    """Rows of train_label_coordinates.csv for the labelled, present cells."""
    rows = []
    for level in range(NUM_LEVELS):
        targets = A.label_targets(an, level)
        for ci, cond in enumerate(CONDITIONS):
            desc = CONDITION_SERIES[cond]
            if grades[ci, level] == L.EMPTY or desc not in geoms:
                continue
            k, point = _label_slice(geoms[desc], ci, level, targets)
            x, y = geoms[desc].slices[k].to_pixel(point)
            rows.append((study_id, series_ids[desc], geoms[desc].instance_numbers[k],
                         CONDITION_TITLES[cond], LEVEL_TITLES[level], round(x, 3), round(y, 3)))
    return rows


def _write_series(rng, an: A.Anatomy, geom: G.SeriesGeom, task: StudyTask, series_id: int,
                  number: int, opt: SynthOptions) -> dict:
    """Render and write every slice of one series; returns its description for the manifest."""
    if geom.description == SAG_T1:
        contrast = "t1"
    elif geom.description == SAG_T2:
        contrast = "stir" if rng.random() < opt.p_stir else "t2"
    else:
        contrast = "t2"
    look = sample_appearance(rng, contrast)
    enc = sample_encoding(rng, look, opt.p_monochrome1)
    folder = task.images_dir / str(task.study_id) / str(series_id)
    for geom_slice, inst in zip(geom.slices, geom.instance_numbers, strict=True):
        if opt.labels_only:
            continue
        signal = render_slice(an, geom_slice, look, rng)
        write_instance(folder / f"{inst}.dcm", signal, geom_slice, geom,
                       study_id=task.study_id, series_id=series_id, series_number=number,
                       instance_number=inst, contrast=contrast, enc=enc)
    return {"description": geom.description, "order": geom.order, "contrast": contrast,
            "stacks": len({s.stack for s in geom.slices}), "n_slices": len(geom.slices),
            "monochrome1": enc.monochrome1}


def make_study(task: StudyTask) -> StudyResult:
    """Generate one study (its own random stream, so any worker order gives the same bytes)."""
    rng = np.random.default_rng([task.seed, task.index])
    opt = task.options
    level = L.DIFFICULTIES[opt.difficulty]
    grades = L.sample_grades(rng, task.balance)
    latent = L.sample_latent(rng, grades, level.grade_ranges)
    empty = L.sample_empty(rng, opt.empty_scale)
    # Its own stream, so "easy" (no noise) draws exactly what it always drew.
    read = L.reader_labels(np.random.default_rng([task.seed, task.index, 1]), grades, latent, level)
    an = A.sample_anatomy(rng, latent)
    geoms = _build_series(rng, an, opt)
    series_ids = dict(zip(SERIES_DESCRIPTIONS, task.series_ids, strict=True))
    labelled = np.where(empty, L.EMPTY, read)
    result = StudyResult(task.study_id, labelled, latent,
                         n_relabelled=int(((read != grades) & ~empty).sum()))
    for number, desc in enumerate(SERIES_DESCRIPTIONS, start=1):
        if desc not in geoms:
            continue
        sid = series_ids[desc]
        result.series_rows.append((task.study_id, sid, desc))
        result.series_info[sid] = _write_series(rng, an, geoms[desc], task, sid, number, opt)
        result.n_images += 0 if opt.labels_only else len(geoms[desc].slices)
    result.coord_rows = _coordinates(task.study_id, series_ids, geoms, an, labelled)
    return result
