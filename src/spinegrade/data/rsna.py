"""The sample index: one row per (study, condition, level) from the competition CSVs.

Joins ``train.csv`` (labels), ``train_label_coordinates.csv`` (where each label sits) and
``train_series_descriptions.csv`` (what each series is). Nothing is dropped silently: every
row left out, and every oddity kept, is a :class:`Problem`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from spinegrade.constants import (
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    LEVEL_TITLE_TO_INDEX,
    LEVELS,
    SERIES_DESCRIPTIONS,
    SEVERITY_TO_INDEX,
    TITLE_TO_CONDITION,
    train_column,
)
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path

TRAIN_CSV = "train.csv"
COORDS_CSV = "train_label_coordinates.csv"
SERIES_CSV = "train_series_descriptions.csv"
IMAGES_DIR = "train_images"

INDEX_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "x", "y", "condition", "level", "level_idx",
    "label", "series_description",
)


@dataclass(frozen=True)
class Problem:
    """One file or row that was skipped, or kept with a warning, and why.

    Attributes:
        study_id: study, or -1 when unknown.
        series_id: series, or -1 when unknown.
        file: the file concerned (CSV or DICOM), relative to the data dir where possible.
        row: 1-based data row in ``file`` for CSV problems, -1 otherwise.
        kind: short machine-readable reason, e.g. ``empty_label``, ``missing_series``.
        severity: ``skipped`` (the sample/file is left out) or ``warning`` (kept).
        message: one human-readable sentence.
    """

    study_id: int
    series_id: int
    file: str
    row: int
    kind: str
    severity: str
    message: str


PROBLEM_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Problem))


def write_problems(path: str | Path, problems: list[Problem]) -> None:
    """Write ``problems.csv`` (header always present) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROBLEM_COLUMNS)
        writer.writeheader()
        for p in problems:
            writer.writerow(asdict(p))


def read_problems(path: str | Path) -> list[Problem]:
    """Read a ``problems.csv`` written by :func:`write_problems`."""
    df = pd.read_csv(path, dtype={"file": str, "message": str}, keep_default_na=False)
    return [Problem(int(r.study_id), int(r.series_id), r.file, int(r.row), r.kind, r.severity,
                    r.message) for r in df.itertuples(index=False)]


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: file not found; is this an RSNA 2024 Lumbar Spine data folder?")
    try:
        df = pd.read_csv(path, skip_blank_lines=False)
    except Exception as e:  # pandas raises several types for malformed CSVs
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    # 1-based data row as a spreadsheet shows it, minus the header.
    df["_row"] = range(1, len(df) + 1)
    return df


def _as_int(value: object) -> int | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def _labels(data_dir: Path, condition: str, problems: list[Problem]) -> dict[tuple[int, int], int]:
    """(study_id, level_idx) -> label index from train.csv; empty/bad cells become Problems."""
    df = _read_csv(data_dir / TRAIN_CSV, ("study_id",) + tuple(
        train_column(condition, lv) for lv in LEVELS))
    labels: dict[tuple[int, int], int] = {}
    for rec in df.to_dict("records"):
        row = rec["_row"]
        study = _as_int(rec["study_id"])
        if study is None:
            if all(pd.isna(v) for k, v in rec.items() if k != "_row"):
                continue  # blank trailing rows in some published copies: not data
            problems.append(Problem(-1, -1, TRAIN_CSV, row, "bad_study_id", "skipped",
                                    f"study_id {rec['study_id']!r} is not an integer"))
            continue
        for li, level in enumerate(LEVELS):
            value = rec[train_column(condition, level)]
            if pd.isna(value) or str(value).strip() == "":
                problems.append(Problem(study, -1, TRAIN_CSV, row, "empty_label", "skipped",
                                        f"no label for {condition} {level}"))
            elif str(value).strip() not in SEVERITY_TO_INDEX:
                problems.append(Problem(study, -1, TRAIN_CSV, row, "bad_label", "skipped",
                                        f"unknown severity {value!r} for {condition} {level}"))
            else:
                labels[(study, li)] = SEVERITY_TO_INDEX[str(value).strip()]
    return labels


def _series_descriptions(data_dir: Path, problems: list[Problem]) -> dict[int, str]:
    df = _read_csv(data_dir / SERIES_CSV, ("study_id", "series_id", "series_description"))
    out: dict[int, str] = {}
    for rec in df.to_dict("records"):
        series = _as_int(rec["series_id"])
        if series is None:
            continue
        desc = str(rec["series_description"]).strip()
        if desc not in SERIES_DESCRIPTIONS:
            problems.append(Problem(_as_int(rec["study_id"]) or -1, series, SERIES_CSV,
                                    rec["_row"], "unknown_series_description", "warning",
                                    f"series description {desc!r} is not one of "
                                    f"{', '.join(SERIES_DESCRIPTIONS)}"))
        out[series] = desc
    return out


def _coordinate_rows(data_dir: Path, condition: str, problems: list[Problem]) -> list[dict]:
    """Rows of the coordinates CSV for ``condition``, validated (bad ones become Problems)."""
    df = _read_csv(data_dir / COORDS_CSV,
                   ("study_id", "series_id", "instance_number", "condition", "level", "x", "y"))
    rows = []
    for rec in df.to_dict("records"):
        row = rec["_row"]
        title = str(rec["condition"]).strip()
        study, series = _as_int(rec["study_id"]), _as_int(rec["series_id"])
        if study is None and series is None and pd.isna(rec["condition"]):
            continue  # blank line
        if title not in TITLE_TO_CONDITION:
            problems.append(Problem(study or -1, series or -1, COORDS_CSV, row,
                                    "unknown_condition", "skipped",
                                    f"condition {title!r} is not one of the five"))
            continue
        if TITLE_TO_CONDITION[title] != condition:
            continue
        level = str(rec["level"]).strip()
        instance = _as_int(rec["instance_number"])
        x, y = pd.to_numeric(rec["x"], errors="coerce"), pd.to_numeric(rec["y"], errors="coerce")
        bad = None
        if study is None or series is None or instance is None:
            bad = ("bad_coordinate_row", "study_id, series_id or instance_number is not an integer")
        elif level not in LEVEL_TITLE_TO_INDEX:
            bad = ("unknown_level", f"level {level!r} is not one of L1/L2 .. L5/S1")
        elif not (math.isfinite(x) and math.isfinite(y)):
            bad = ("missing_coordinate", f"x, y = {rec['x']!r}, {rec['y']!r}")
        elif x < 0 or y < 0:
            bad = ("coordinate_out_of_image", f"negative coordinate ({x}, {y})")
        if bad:
            problems.append(Problem(study or -1, series or -1, COORDS_CSV, row, bad[0], "skipped",
                                    bad[1]))
            continue
        rows.append(dict(study_id=study, series_id=series, instance_number=instance,
                         x=float(x), y=float(y), level_idx=LEVEL_TITLE_TO_INDEX[level], _row=row))
    return rows


def _join(data_dir: Path, condition: str, coords: list[dict], labels: dict[tuple[int, int], int],
          descriptions: dict[int, str], problems: list[Problem]) -> list[dict]:
    """Match coordinates with labels and series; unmatched labels/coordinates are Problems."""
    expected = CONDITION_SERIES[condition]
    out, seen = [], set()
    for c in coords:
        study, series, li = c["study_id"], c["series_id"], c["level_idx"]
        where = dict(study_id=study, series_id=series, file=COORDS_CSV, row=c["_row"])
        if (study, li) in seen:
            problems.append(Problem(**where, kind="duplicate_coordinate", severity="skipped",
                                    message=f"a second point for {LEVELS[li]}; the first is used"))
            continue
        seen.add((study, li))
        if (study, li) not in labels:
            # Either an empty label (already reported) or a study absent from train.csv.
            problems.append(Problem(**where, kind="no_label", severity="skipped",
                                    message=f"no usable train.csv label for {LEVELS[li]}"))
            continue
        desc = descriptions.get(series)
        if desc is None:
            problems.append(Problem(**where, kind="unknown_series", severity="skipped",
                                    message=f"series {series} is not in {SERIES_CSV}"))
            continue
        if not (data_dir / IMAGES_DIR / str(study) / str(series)).is_dir():
            problems.append(Problem(**where, kind="missing_series", severity="skipped",
                                    message=f"folder {IMAGES_DIR}/{study}/{series} not found"))
            continue
        if desc != expected:
            problems.append(Problem(**where, kind="unexpected_series_type", severity="warning",
                                    message=f"{condition} labeled on {desc!r}, expected {expected!r}"))
        out.append(dict(study_id=study, series_id=series, instance_number=c["instance_number"],
                        x=c["x"], y=c["y"], condition=condition, level=LEVELS[li],
                        level_idx=li, label=labels[(study, li)], series_description=desc))
    for study, li in sorted(set(labels) - seen):
        problems.append(Problem(study, -1, TRAIN_CSV, -1, "no_coordinates", "skipped",
                                f"label for {LEVELS[li]} has no point in {COORDS_CSV}"))
    return out


def build_index(data_dir: str | Path, condition: str = CONDITIONS[0]) -> tuple[pd.DataFrame, list[Problem]]:
    """The sample index of one condition.

    Args:
        data_dir: folder with ``train.csv``, ``train_label_coordinates.csv``,
            ``train_series_descriptions.csv`` and ``train_images/``.
        condition: one of ``constants.CONDITIONS``.

    Returns:
        ``(index, problems)``: index has one row per usable (study, condition, level) with
        columns ``INDEX_COLUMNS``, sorted by study and level; problems lists everything
        left out or suspicious.

    Raises:
        UserError: a CSV is missing, unreadable or lacks columns; unknown condition.
    """
    if condition not in CONDITION_TITLES:
        raise UserError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    data_dir = Path(data_dir)
    problems: list[Problem] = []
    labels = _labels(data_dir, condition, problems)
    descriptions = _series_descriptions(data_dir, problems)
    coords = _coordinate_rows(data_dir, condition, problems)
    rows = _join(data_dir, condition, coords, labels, descriptions, problems)
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    index = index.sort_values(["study_id", "level_idx"], kind="stable").reset_index(drop=True)
    for col in ("study_id", "series_id", "instance_number", "level_idx", "label"):
        index[col] = index[col].astype("int64")
    index[["x", "y"]] = index[["x", "y"]].astype("float64")
    return index, problems
