"""The studies to predict: their series folders, read into Volumes and localised.

A study comes from a dataset's ``{split}_series_descriptions.csv`` or from one folder of
series folders (types from the DICOM SeriesDescription). Reading never raises on bad data:
a missing or unreadable series, or one the localizer fails on, becomes a ``Problem``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import pandas as pd

from spinegrade.constants import (
    AXIAL_T2,
    CONDITION_SERIES,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SERIES_DESCRIPTIONS,
    images_dir_name,
    series_descriptions_csv,
)
from spinegrade.data.rsna import series_folder
from spinegrade.engine.localize import LocalizerRun
from spinegrade.errors import UserError
from spinegrade.io.dicom import Volume, read_series, read_stacks
from spinegrade.problems import Problem

# Key of the k-th further stack of a multi-stack series in read_volumes: "<series id>:<k>".
STACK_SEPARATOR = ":"


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


def read_volumes(st: StudyInput, problems: list[Problem]) -> dict[str, tuple[str, Volume]]:
    """series id -> (description, Volume); missing or unreadable series become problems.

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
                for k, vol in enumerate(read_stacks(folder)):
                    out[sid if k == 0 else f"{sid}{STACK_SEPARATOR}{k}"] = (desc, vol)
            else:
                out[sid] = (desc, read_series(folder))
        except (UserError, OSError, ValueError) as e:
            problems.append(Problem.skipped(kind="unreadable_series", study_id=_int(st.study_id),
                                            series_id=_int(sid), file=str(folder),
                                            message=str(e)))
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
