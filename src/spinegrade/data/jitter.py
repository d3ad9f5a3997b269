"""Training on the crops prediction will see: where each training crop is centred.

At prediction the crops sit where the localizer put them, a little off (and sometimes a
slice off) the labelled point. Two data settings make training crops look like that:

* ``coordinates`` ``predicted`` with ``coordinates_csv``: centre the crops on predicted
  coordinates (e.g. a localizer's out-of-fold locations of the training studies) instead of
  the labelled ones; :func:`read_predicted_coordinates` accepts the
  ``train_label_coordinates.csv`` format and ``spinegrade predict``'s ``locations.csv``.
* ``jitter_mm`` / ``jitter_px`` / ``jitter_distribution`` / ``jitter_slices``: add a random
  placement error to every crop centre while preparing the cache, in the image plane (mm
  through PixelSpacing, or native pixels) and along the stack (the centre slice moved by
  -k..k slices in spatial order with the given probabilities).

Draws are seeded per sample (``jitter_seed`` and the sample's index position), so a cache
is reproducible whatever the number of workers. Nothing here runs at prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinegrade.constants import (
    CONDITION_TITLES,
    COORD_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
)
from spinegrade.data.preprocess import CropRequest
from spinegrade.data.rsna import build_index
from spinegrade.errors import UserError

LABELS, PREDICTED = "labels", "predicted"
NORMAL, UNIFORM = "normal", "uniform"
# locations.csv marks points the anatomy checks refused (engine.studies.REFUSED).
REFUSED_COLUMN = "refused"


def check_settings(settings: Mapping[str, Any]) -> None:
    """UserError naming the data setting that cannot work, and how to fix it."""
    if settings.get("coordinates", LABELS) == PREDICTED:
        csv = str(settings.get("coordinates_csv", ""))
        if not csv:
            raise UserError("data.coordinates=predicted needs data.coordinates_csv=FILE "
                            "(a train_label_coordinates.csv-format file or predict's "
                            "locations.csv)")
        if not Path(csv).is_file():
            raise UserError(f"data.coordinates_csv: {csv} not found")
    probs = list(settings.get("jitter_slices", ()) or ())
    if probs and (len(probs) % 2 == 0 or min(probs) < 0 or sum(probs) <= 0):
        raise UserError(f"data.jitter_slices {probs}: give an odd number of non-negative "
                        "probabilities for slice offsets -k..k, e.g. [0.1, 0.8, 0.1]")
    if settings.get("jitter_mm", 0.0) < 0 or settings.get("jitter_px", 0.0) < 0:
        raise UserError("data.jitter_mm and data.jitter_px must be >= 0")


def is_jittered(settings: Mapping[str, Any]) -> bool:
    """Whether the settings ask for any placement error."""
    return bool(settings.get("jitter_mm", 0.0) or settings.get("jitter_px", 0.0)
                or settings.get("jitter_slices", ()))


def _shift(rng: np.random.Generator, scale: float, distribution: str) -> tuple[float, float]:
    if scale <= 0:
        return 0.0, 0.0
    if distribution == UNIFORM:
        return tuple(float(v) for v in rng.uniform(-scale, scale, 2))  # type: ignore[return-value]
    return tuple(float(v) for v in rng.normal(0.0, scale, 2))  # type: ignore[return-value]


def jitter_request(request: CropRequest, sample_id: int, settings: Mapping[str, Any]
                   ) -> CropRequest:
    """``request`` with its placement error drawn (the same for the same sample and seed)."""
    rng = np.random.default_rng([int(settings.get("jitter_seed", 0)), int(sample_id)])
    dist = settings.get("jitter_distribution", NORMAL)
    shift_mm = _shift(rng, float(settings.get("jitter_mm", 0.0)), dist)
    shift_px = _shift(rng, float(settings.get("jitter_px", 0.0)), dist)
    probs = np.asarray(settings.get("jitter_slices", ()) or (), dtype=np.float64)
    offset = 0
    if probs.size:
        k = len(probs) // 2
        offset = int(rng.choice(np.arange(-k, k + 1), p=probs / probs.sum()))
    return dataclasses.replace(request, slice_offset=offset, shift_mm=shift_mm,
                               shift_px=shift_px)


def jitter_requests(requests: Sequence[CropRequest], sample_ids: Sequence[int],
                    settings: Mapping[str, Any]) -> tuple[CropRequest, ...]:
    """:func:`jitter_request` of each request (unchanged without jitter settings)."""
    if not is_jittered(settings):
        return tuple(requests)
    return tuple(jitter_request(r, s, settings)
                 for r, s in zip(requests, sample_ids, strict=True))


def training_index(data_dir: str | Path, settings: Mapping[str, Any]
                   ) -> tuple[pd.DataFrame, list]:
    """``rsna.build_index`` of ``settings["condition"]``, centred on ``coordinates_csv``
    when ``coordinates`` is predicted: ``(index, problems)``."""
    if settings.get("coordinates", LABELS) != PREDICTED:
        return build_index(data_dir, settings["condition"])
    csv = Path(settings["coordinates_csv"])
    return build_index(data_dir, settings["condition"],
                       coordinates=read_predicted_coordinates(csv), coordinates_file=csv.name)


def read_predicted_coordinates(path: str | Path) -> pd.DataFrame:
    """Predicted points as a ``train_label_coordinates.csv`` frame (title-case names).

    Accepts that format itself, or ``spinegrade predict``'s ``locations.csv`` (condition
    and level in column form, e.g. ``spinal_canal_stenosis``, ``l3_l4``); rows its anatomy
    checks refused are left out.

    Raises:
        UserError: unreadable, or without the coordinate columns.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read predicted coordinates ({e})") from None
    missing = [c for c in COORD_COLUMNS if c not in df]
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(missing)}; expected the "
                        f"train_label_coordinates.csv columns {', '.join(COORD_COLUMNS)}")
    if REFUSED_COLUMN in df:
        df = df[df[REFUSED_COLUMN].fillna("").astype(str) == ""]
    df = df.copy()
    df["condition"] = df["condition"].map(lambda c: CONDITION_TITLES.get(c, c))
    to_title = dict(zip(LEVELS, LEVEL_TITLES, strict=True))
    df["level"] = df["level"].map(lambda v: to_title.get(v, v))
    return df[list(COORD_COLUMNS)]
