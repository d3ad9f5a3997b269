"""Located levels of whole studies against the label coordinates, where labels exist.

Used by ``predict`` on a labelled split and by ``benchmarks/localizer.py``: the located rows
of ``engine.localize.locate_study`` are compared with ``train_label_coordinates.csv`` in
patient coordinates, whichever series or stack either point lies on, so a study's axial
stacks and its two sagittal series are judged in one frame. The errors frame has the
columns of ``metrics.keypoint_errors``, so ``metrics.summarize_errors`` and
``metrics.wrong_disc`` apply unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.constants import COORDINATES_CSV, LEVELS
from spinegrade.data import rsna
from spinegrade.engine.studies import STACK_SEPARATOR
from spinegrade.io.atomic import atomic_path
from spinegrade.io.dicom import Volume
from spinegrade.io.geometry import StackGeometry, slice_normal
from spinegrade.metrics import PRED_POINT, TRUE_POINT, summarize_errors
from spinegrade.problems import Problem

_log = logging.getLogger(__name__)


def read_truth(data_dir: str | Path, split: str, problems: list[Problem]) -> pd.DataFrame | None:
    """The label coordinates of ``data_dir`` when ``split`` is the labelled one, else None."""
    if split != rsna.LABELLED_SPLIT or not (Path(data_dir) / COORDINATES_CSV).is_file():
        return None
    return rsna.read_coordinates(data_dir, problems)


def _find(volumes: dict[str, Volume], series_id: object, instance: int
          ) -> tuple[Volume, int] | None:
    """The stack of ``series_id`` (any of its stacks) holding ``instance``, and its index."""
    for key, vol in volumes.items():
        if str(key).split(STACK_SEPARATOR)[0] != str(series_id):
            continue
        try:
            return vol, vol.index_of(int(instance))
        except KeyError:
            continue
    return None


def _compare(t: pd.Series, p: pd.Series, tv: Volume, tj: int, pv: Volume, pj: int, desc: str
             ) -> dict:
    """One labelled point against its prediction (``metrics.keypoint_errors`` columns)."""
    p_true, p_pred = tv.patient_point(tj, t["x"], t["y"]), pv.patient_point(pj, p["x"], p["y"])
    d = p_pred - p_true
    normal = slice_normal(tv.slice_orientation(tj))
    off_plane = float(d @ normal)
    gap = float(StackGeometry.from_volume(tv).gaps()[tj])
    return {"study_id": t["study_id"], "series_id": t["series_id"], "series_description": desc,
            "condition": t["condition"], "level": LEVELS[int(t["level_idx"])],
            "true_instance": int(t["instance_number"]), "pred_instance": int(p["instance_number"]),
            "true_x": t["x"], "true_y": t["y"], "pred_x": p["x"], "pred_y": p["y"],
            "score": p["score"], "slice_error": int(round(off_plane / gap)),
            "error_mm": float(np.linalg.norm(d - off_plane * normal)),
            "error_3d_mm": float(np.linalg.norm(d)),
            **dict(zip(TRUE_POINT, p_true, strict=True)),
            **dict(zip(PRED_POINT, p_pred, strict=True))}


def located_errors(located: pd.DataFrame, truth: pd.DataFrame, volumes: dict[str, Volume]
                   ) -> pd.DataFrame:
    """Every labelled point of one study that was located, against its prediction.

    ``slice_error`` is the predicted point's distance from the true slice's plane in slice
    gaps (rounded), so a prediction on another stack of an axial series still counts.

    Args:
        located: ``locate_study`` rows of the study (series ids as ``read_volumes`` keys).
        truth: coordinate rows (``rsna.read_coordinates``); other studies are ignored.
        volumes: series key -> Volume, as read for the study.
    """
    if located.empty:
        return pd.DataFrame()
    study = located["study_id"].iloc[0]
    rows = []
    for _, t in truth[truth["study_id"].astype(str) == str(study)].iterrows():
        hit = located[(located["condition"] == t["condition"])
                      & (located["level_idx"] == t["level_idx"])]
        true_at = _find(volumes, t["series_id"], t["instance_number"])
        if hit.empty or true_at is None:
            continue
        p = hit.iloc[0]
        pred_at = _find(volumes, p["series_id"], p["instance_number"])
        if pred_at is not None:
            rows.append(_compare(t, p, *true_at, *pred_at, p["series_description"]))
    return pd.DataFrame(rows)


def localization_summary(errors: pd.DataFrame) -> pd.DataFrame:
    """Per series type and level, per series type, and overall (``summarize_errors`` columns)."""
    by = ("series_description", "level")
    per_level = summarize_errors(errors, by=by)
    per_type = summarize_errors(errors, by=("series_description",)).assign(level="all")
    return pd.concat([per_level.iloc[:-1], per_type], ignore_index=True)[
        [*by, *[c for c in per_level.columns if c not in by]]]


def write_localization(path: Path, errors: pd.DataFrame) -> pd.DataFrame:
    """Write :func:`localization_summary` as CSV, log the wrong-disc rates, return the table."""
    table = localization_summary(errors)
    with atomic_path(path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    for r in table[table["level"] == "all"].itertuples():
        _log.info("localisation against the labels, %s: wrong disc %.3f, median point error "
                  "%.2f mm, slice within +-1 %.3f (%d points)", r.series_description,
                  r.wrong_disc_rate, r.median_mm, r.slice_within1, r.n)
    return table


@dataclass
class LocalizationCheck:
    """Collects :func:`located_errors` study by study while ``predict`` runs (no-op without labels)."""

    truth: pd.DataFrame | None
    errors: list[pd.DataFrame] = field(default_factory=list)

    @classmethod
    def open(cls, data_dir: str | Path | None, split: str, problems: list[Problem]
             ) -> LocalizationCheck:
        """Labels of ``data_dir``'s ``split`` when it is the labelled one, else a no-op check."""
        return cls(None if data_dir is None else read_truth(data_dir, split, problems))

    def add(self, located: pd.DataFrame, volumes: dict[str, Volume]) -> None:
        """Judge one study's located levels (its volumes are still in memory)."""
        if self.truth is not None:
            self.errors.append(located_errors(located, self.truth, volumes))

    def write(self, path: Path) -> dict[str, Path]:
        """``{"localization": path}`` after writing the summary to ``path``; {} without labels."""
        if not any(not e.empty for e in self.errors):
            return {}
        write_localization(path, pd.concat(self.errors, ignore_index=True))
        return {"localization": path}
