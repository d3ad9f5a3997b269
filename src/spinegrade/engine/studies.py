"""The studies to predict: their series folders, read into Volumes and localised.

A study comes from a dataset's ``{split}_series_descriptions.csv`` or from one folder of
series folders (types from the DICOM SeriesDescription). Reading never raises on bad data:
a missing or unreadable series, or one the localizer fails on, becomes a ``Problem``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from spinegrade.constants import (
    AXIAL_T2,
    CONDITION_SERIES,
    CONDITIONS,
    LEVELS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SERIES_DESCRIPTIONS,
    images_dir_name,
    series_descriptions_csv,
)
from spinegrade.data.plausibility import (
    cross_series_problem,
    disc_chain_problem,
    lumbar_header_problem,
)
from spinegrade.data.rsna import series_folder
from spinegrade.engine.localize import LocalizerRun
from spinegrade.errors import UserError
from spinegrade.io.dicom import Volume, read_series, read_stacks
from spinegrade.problems import Problem

# Key of the k-th further stack of a multi-stack series in read_volumes: "<series id>:<k>".
STACK_SEPARATOR = ":"
# problems.csv kinds of the anatomy checks.
NOT_LUMBAR_SPINE = "not_lumbar_spine"
IMPLAUSIBLE_DISCS = "implausible_discs"


@dataclass
class StudyInput:
    """One study to predict: its id and its series as (series_id, description, folder)."""

    study_id: str
    series: list[tuple[str, str, Path]] = field(default_factory=list)


def series_type(description: str, orientation: str = "") -> str | None:
    """Map a DICOM SeriesDescription (and orientation label) to one of SERIES_DESCRIPTIONS."""
    if description in SERIES_DESCRIPTIONS:
        return description
    d = description.lower()
    if "ax" in d or orientation == "AX":
        return AXIAL_T2
    if "sag" in d or orientation == "SAG":
        if "stir" in d or "t2" in d:
            return SAGITTAL_T2
        if "t1" in d:
            return SAGITTAL_T1
    return None


def studies_from_dataset(data_dir: Path, split: str = "test") -> list[StudyInput]:
    """Studies listed in ``{split}_series_descriptions.csv``; images in ``{split}_images``."""
    csv = data_dir / series_descriptions_csv(split)
    if not csv.is_file():
        raise UserError(f"{csv} not found: DATA_DIR must hold {csv.name} "
                        f"and {images_dir_name(split)}/ (or use --study for one study folder)")
    df = pd.read_csv(csv, dtype=str).dropna(subset=["study_id"])
    studies: dict[str, StudyInput] = {}
    for r in df.itertuples():
        st = studies.setdefault(r.study_id, StudyInput(r.study_id))
        if isinstance(r.series_id, str) and r.series_id:
            desc = str(r.series_description)
            st.series.append((r.series_id, series_type(desc) or desc,
                              series_folder(data_dir, r.study_id, r.series_id, split)))
    return list(studies.values())


def study_from_folder(folder: Path) -> tuple[StudyInput, list[Problem]]:
    """One study folder of series folders; series types from their DICOM headers."""
    if not folder.is_dir():
        raise UserError(f"--study {folder}: not a folder")
    problems: list[Problem] = []
    st = StudyInput(folder.name)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            vol = read_series(sub, load_pixels=False)
        except (UserError, OSError) as e:
            problems.append(Problem.skipped(kind="unreadable_series", study_id=_int(st.study_id),
                                            series_id=_int(sub.name), file=str(sub),
                                            message=str(e)))
            continue
        desc = series_type(vol.series_description, vol.orientation_label)
        if desc is None:
            problems.append(Problem.skipped(kind="unknown_series_type", study_id=_int(st.study_id),
                                            series_id=_int(sub.name), file=str(sub),
                                            message=f"SeriesDescription '{vol.series_description}' "
                                                    f"({vol.orientation_label}) is not one of "
                                                    f"{', '.join(SERIES_DESCRIPTIONS)}"))
            continue
        st.series.append((sub.name, desc, sub))
    return st, problems


def _int(text: str) -> int:
    return int(text) if str(text).isdigit() else -1


def header_problem(vol: Volume) -> str | None:
    """Why the series' header says it is not a lumbar spine (BodyPartExamined, the series
    and study descriptions, ProtocolName), or None."""
    return lumbar_header_problem(vol.series_description, vol.body_part_examined,
                                 study_description=vol.study_description,
                                 protocol_name=vol.protocol_name)


def read_volumes(st: StudyInput, problems: list[Problem], *, check_anatomy: bool = True
                 ) -> dict[str, tuple[str, Volume]]:
    """series id -> (description, Volume); missing or unreadable series become problems,
    and with ``check_anatomy`` so does a series whose header names other anatomy.

    An Axial T2 series contributes every stack it holds (``STACK_SEPARATOR``).
    """
    out: dict[str, tuple[str, Volume]] = {}
    for sid, desc, folder in st.series:
        if not folder.is_dir():
            problems.append(Problem.skipped(kind="missing_series", study_id=_int(st.study_id),
                                            series_id=_int(sid), file=str(folder),
                                            message="series folder not found"))
            continue
        try:
            if desc == AXIAL_T2:
                # Every stack (tilted per-disc blocks are stacks of their own): each disc is
                # mapped into all of them. Further stacks get the key "<series id>:<k>".
                stacks = {sid if k == 0 else f"{sid}{STACK_SEPARATOR}{k}": vol
                          for k, vol in enumerate(read_stacks(folder))}
            else:
                stacks = {sid: read_series(folder)}
        except (UserError, OSError, ValueError) as e:
            problems.append(Problem.skipped(kind="unreadable_series", study_id=_int(st.study_id),
                                            series_id=_int(sid), file=str(folder),
                                            message=str(e)))
            continue
        for key, vol in stacks.items():
            why = header_problem(vol) if check_anatomy else None
            if why is not None:
                problems.append(Problem.skipped(kind=NOT_LUMBAR_SPINE, study_id=_int(st.study_id),
                                                series_id=_int(sid), file=str(folder),
                                                message=f"{why}: series not used"))
                break  # one header per series: its other stacks say the same
            out[key] = (desc, vol)
    present = {d for d, _ in out.values()}
    for desc in sorted(set(CONDITION_SERIES.values()) - present):
        problems.append(Problem.warning(kind="no_series", study_id=_int(st.study_id),
                                        message=f"no readable {desc} series: its conditions "
                                                "get the prior"))
    return out


def locate_levels(localizer: LocalizerRun, st: StudyInput,
                  volumes: dict[str, tuple[str, Volume]], problems: list[Problem]) -> pd.DataFrame:
    """Localizer rows for the study, with the real series ids."""
    keys = list(volumes)
    prepared = []
    for k, sid in enumerate(keys):
        desc, vol = volumes[sid]
        if desc not in localizer.series_descriptions:
            continue
        try:
            prepared.append((desc, localizer.prepare(vol, _int(st.study_id), k)))
        except (ValueError, cv2.error) as e:
            problems.append(Problem.skipped(kind="localizer_failed", study_id=_int(st.study_id),
                                            series_id=_int(sid), file=str(vol.path),
                                            message=str(e)))
    located = localizer.locate(prepared)
    located["series_id"] = [keys[int(k)] for k in located["series_id"]]
    located["study_id"] = st.study_id
    return located


# --- are the located discs one lumbar spine? -------------------------------------------------

# Largest distance (mm, ignoring left-right) between one disc as Sagittal T2/STIR (canal) and
# Sagittal T1 (foramina) place it: half the ~35 mm from one disc to the next.
CROSS_SERIES_TOL_MM = 17.5
REFUSED = "refused"


def patient_points(located: pd.DataFrame, volumes: dict[str, tuple[str, Volume]]) -> np.ndarray:
    """(n, 3) patient mm (LPS) of the located rows; NaN where the geometry is unknown."""
    out = np.full((len(located), 3), np.nan)
    for i, r in enumerate(located.itertuples()):
        if r.series_id not in volumes:
            continue
        vol = volumes[r.series_id][1]
        try:
            j = vol.index_of(int(r.instance_number))
        except KeyError:
            continue
        out[i] = vol.patient_point(j, float(r.x), float(r.y))  # the slice's own plane
    return out


def _chains(located: pd.DataFrame, points: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """condition -> ((5, 3) points, (5,) scores), NaN for levels not located."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for pos, r in enumerate(located.itertuples()):
        pts, conf = out.setdefault(r.condition, (np.full((len(LEVELS), 3), np.nan),
                                                 np.full(len(LEVELS), np.nan)))
        pts[int(r.level_idx)], conf[int(r.level_idx)] = points[pos], float(r.score)
    return out


def check_locations(located: pd.DataFrame, volumes: dict[str, tuple[str, Volume]],
                    min_score: float, problems: list[Problem], study_id: str) -> pd.DataFrame:
    """``located`` with a ``refused`` column: "" where a point may be graded, else why not.

    Per condition, its five points (patient mm) must form one lumbar disc chain
    (``data.plausibility.disc_chain_problem``: head-to-feet order, lumbar spacings, no sharp
    kinks, at least three levels with score >= ``min_score``); where they do not, every
    level of the condition is refused. Then each disc of the spinal canal must lie within
    ``CROSS_SERIES_TOL_MM`` of the same disc's foramina (left-right ignored); a level where
    they disagree is refused for both. Each refusal is a problem.
    """
    located = located.reset_index(drop=True).copy()
    located[REFUSED] = ""
    chains = _chains(located, patient_points(located, volumes))
    for cond, (pts, conf) in chains.items():
        why = disc_chain_problem(pts, conf, min_score)
        if why is None:
            continue
        located.loc[located["condition"] == cond, REFUSED] = f"discs not plausible: {why}"
        problems.append(Problem.skipped(kind=IMPLAUSIBLE_DISCS, study_id=_int(study_id),
                                        message=f"{cond}: {why}; its levels are not graded"))
    _check_cross_series(located, chains, problems, study_id)
    return located


def _check_cross_series(located: pd.DataFrame, chains: dict, problems: list[Problem],
                        study_id: str) -> None:
    """Refuse the levels where the canal and a foramen disagree about the disc."""
    spinal = CONDITIONS[0]
    if spinal not in chains:
        return
    for side in (c for c in CONDITIONS if CONDITION_SERIES[c] == SAGITTAL_T1 and c in chains):
        for lv in range(len(LEVELS)):
            rows = located["level_idx"].astype(int) == lv
            here = rows & located["condition"].isin([spinal, side])
            if (located.loc[here, REFUSED] != "").any():
                continue
            keep = np.arange(len(LEVELS)) == lv
            a, b = (np.where(keep[:, None], chains[c][0], np.nan) for c in (spinal, side))
            why = cross_series_problem(a, b, CROSS_SERIES_TOL_MM, names=(spinal, side),
                                       ignore_lateral=True)
            if why is None:
                continue
            located.loc[here, REFUSED] = f"series disagree: {why}"
            problems.append(Problem.skipped(kind=IMPLAUSIBLE_DISCS, study_id=_int(study_id),
                                            message=f"{LEVELS[lv]}: {why}; not graded"))


def refused_levels(located: pd.DataFrame, condition: str) -> dict[int, str]:
    """level index -> why ``check_locations`` refused it, for one condition."""
    if REFUSED not in located:
        return {}
    rows = located[(located["condition"] == condition) & (located[REFUSED] != "")]
    return {int(r.level_idx): str(r.refused) for r in rows.itertuples()}
