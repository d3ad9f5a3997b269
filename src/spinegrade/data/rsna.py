"""The competition CSVs, parsed once each, and the sample index built from them.

``train.csv`` (labels), ``train_label_coordinates.csv`` (where each label sits) and
``train_series_descriptions.csv`` (what each series is) each have one parser here
(:func:`train_labels` / :func:`read_train_labels`, :func:`read_coordinates`,
:func:`read_series_descriptions`); :func:`build_index` joins them into one row per
(study, condition, level). Nothing is dropped silently: every row left out, and every oddity
kept, is a :class:`~spinegrade.problems.Problem`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from spinegrade.constants import (
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    COORD_COLUMNS,
    COORDINATES_CSV,
    LEVEL_TITLE_TO_INDEX,
    LEVELS,
    SERIES_COLUMNS,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
    SEVERITY_TO_INDEX,
    TITLE_TO_CONDITION,
    TRAIN_CSV,
    images_dir_name,
    series_descriptions_csv,
    train_column,
)
from spinegrade.errors import UserError
from spinegrade.problems import Problem

# The labelled split: the only one with train.csv and the coordinates CSV.
LABELLED_SPLIT = "train"

INDEX_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "x", "y", "condition", "level", "level_idx",
    "label", "series_description",
)
# read_train_labels: one row per usable (study, condition, level) cell of train.csv.
LABEL_COLUMNS: tuple[str, ...] = ("study_id", "condition", "level", "level_idx", "label", "row")
# read_coordinates: one row per usable point; ``condition`` in column form.
POINT_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "condition", "level_idx", "x", "y", "row",
)


def series_folder(data_dir: str | Path, study_id: int | str, series_id: int | str,
                  split: str = LABELLED_SPLIT) -> Path:
    """``DATA/<split>_images/<study>/<series>``: the DICOM folder of one series."""
    return Path(data_dir) / images_dir_name(split) / str(study_id) / str(series_id)


def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: file not found; is this an RSNA 2024 Lumbar Spine data folder?")
    try:
        df = pd.read_csv(path, skip_blank_lines=False)
    except Exception as e:  # pandas raises several types for malformed CSVs
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def _records(df: pd.DataFrame) -> list[tuple[int, dict]]:
    """(1-based data row as a spreadsheet shows it, minus the header; record) per row."""
    return list(enumerate(df.to_dict("records"), start=1))


def _as_int(value: object) -> int | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def train_labels(train: pd.DataFrame, problems: list[Problem],
                 conditions: Sequence[str] = CONDITIONS, file: str = TRAIN_CSV) -> pd.DataFrame:
    """The labels of a ``train.csv`` frame, one row per usable cell (``LABEL_COLUMNS``).

    Args:
        train: the CSV as ``pd.read_csv`` gives it (``study_id`` + ``{condition}_{level}``
            columns holding ``Normal/Mild``/``Moderate``/``Severe`` or empty).
        problems: gets a Problem per bad study id, empty or unknown label.
        conditions: conditions whose columns are read (they must exist).
        file: the name problems give the CSV.

    Returns:
        ``study_id`` (int), ``condition``, ``level`` (e.g. ``l3_l4``), ``level_idx``,
        ``label`` (severity index) and ``row`` (1-based data row), in file order.
    """
    out = []
    rows_of: dict[int, list[int]] = {}
    for row, rec in _records(train):
        study = _as_int(rec["study_id"])
        if study is None:
            if all(pd.isna(v) for v in rec.values()):
                continue  # blank trailing rows in some published copies: not data
            problems.append(Problem.skipped(kind="bad_study_id", file=file, row=row,
                                            message=f"study_id {rec['study_id']!r} is not an "
                                                    "integer"))
            continue
        rows_of.setdefault(study, []).append(row)
        for condition in conditions:
            for li, level in enumerate(LEVELS):
                label = _severity(rec[train_column(condition, level)], condition, level,
                                  problems, dict(study_id=study, file=file, row=row))
                if label is not None:
                    out.append((study, condition, level, li, label, row))
    frame = pd.DataFrame(out, columns=list(LABEL_COLUMNS))
    repeated = {st: rows for st, rows in rows_of.items() if len(rows) > 1}
    return _resolve_duplicate_studies(frame, repeated, problems, conditions, file)


def _resolve_duplicate_studies(frame: pd.DataFrame, repeated: dict[int, list[int]],
                               problems: list[Problem], conditions: Sequence[str], file: str
                               ) -> pd.DataFrame:
    """Keep a cell of a study listed on several rows once if every row agrees, else drop it.

    Never resolved by order: a cell the rows disagree on (another grade, or empty on one
    of them) is left out of training, with a Problem naming both rows.
    """
    if not repeated:
        return frame
    drop: list[int] = []
    for study, rows in sorted(repeated.items()):
        for row in rows[1:]:
            problems.append(Problem.warning(
                kind="duplicate_study", study_id=study, file=file, row=row,
                message=f"study {study} is on rows {rows[0]} and {row}; cells they agree on "
                        "are used once, cells they disagree on are left out"))
        mine = frame[frame["study_id"] == study]
        for condition in conditions:
            for li, level in enumerate(LEVELS):
                cell = mine[(mine["condition"] == condition) & (mine["level_idx"] == li)]
                by_row = dict(zip(cell["row"], cell["label"], strict=True))
                values = [by_row.get(r) for r in rows]
                if len(set(values)) == 1:
                    drop += list(cell.index[1:])
                    continue
                drop += list(cell.index)
                said = ", ".join(f"row {r}: {_grade(v)}" for r, v in zip(rows, values, strict=True))
                problems.append(Problem.skipped(
                    kind="conflicting_duplicate", study_id=study, file=file, row=rows[1],
                    message=f"{condition} {level} differs between the rows of study {study} "
                            f"({said}); left out of training (fix {file})"))
    return frame.drop(index=drop).reset_index(drop=True)


def _grade(label: int | None) -> str:
    return "empty" if label is None else SEVERITIES[label]


def _severity(value: object, condition: str, level: str, problems: list[Problem],
              where: dict) -> int | None:
    """The severity index of one train.csv cell; None (and a Problem) if empty or unknown."""
    if pd.isna(value) or str(value).strip() == "":
        problems.append(Problem.skipped(kind="empty_label", **where,
                                        message=f"no label for {condition} {level}"))
        return None
    if str(value).strip() not in SEVERITY_TO_INDEX:
        problems.append(Problem.skipped(kind="bad_label", **where,
                                        message=f"unknown severity {value!r} for {condition} "
                                                f"{level}"))
        return None
    return SEVERITY_TO_INDEX[str(value).strip()]


def read_train_labels(data_dir: str | Path, problems: list[Problem],
                      conditions: Sequence[str] = CONDITIONS) -> pd.DataFrame:
    """:func:`train_labels` of ``DATA/train.csv``.

    Raises:
        UserError: the file is missing, unreadable or lacks the conditions' columns.
    """
    required = ("study_id",) + tuple(train_column(c, lv) for c in conditions for lv in LEVELS)
    return train_labels(_read_csv(Path(data_dir) / TRAIN_CSV, required), problems, conditions)


def read_series_descriptions(data_dir: str | Path, problems: list[Problem],
                             split: str = LABELLED_SPLIT) -> dict[int, str]:
    """series id -> description from ``<split>_series_descriptions.csv``.

    Descriptions other than ``SERIES_DESCRIPTIONS`` are kept, each with a warning; rows
    without an integer series id are left out.

    Raises:
        UserError: the file is missing, unreadable or lacks columns.
    """
    name = series_descriptions_csv(split)
    df = _read_csv(Path(data_dir) / name, SERIES_COLUMNS)
    out: dict[int, str] = {}
    for row, rec in _records(df):
        series = _as_int(rec["series_id"])
        if series is None:
            continue
        desc = str(rec["series_description"]).strip()
        if desc not in SERIES_DESCRIPTIONS:
            problems.append(Problem.warning(
                kind="unknown_series_description", study_id=_as_int(rec["study_id"]),
                series_id=series, file=name, row=row,
                message=f"series description {desc!r} is not one of "
                        f"{', '.join(SERIES_DESCRIPTIONS)}"))
        out[series] = desc
    return out


def read_coordinates(data_dir: str | Path, problems: list[Problem],
                     conditions: Sequence[str] = CONDITIONS) -> pd.DataFrame:
    """:func:`coordinate_points` of ``DATA/train_label_coordinates.csv``.

    Raises:
        UserError: the file is missing, unreadable or lacks columns.
    """
    df = _read_csv(Path(data_dir) / COORDINATES_CSV, COORD_COLUMNS)
    return coordinate_points(df, problems, conditions)


def coordinate_points(df: pd.DataFrame, problems: list[Problem],
                      conditions: Sequence[str] = CONDITIONS, file: str = COORDINATES_CSV
                      ) -> pd.DataFrame:
    """The usable points of a ``train_label_coordinates.csv`` frame for ``conditions``.

    Rows of an unknown condition, and rows of ``conditions`` with a bad id, level or
    coordinate, become Problems; rows of other known conditions are passed over silently.

    Returns:
        ``POINT_COLUMNS``: ints ``study_id, series_id, instance_number, level_idx, row``
        (1-based data row), ``condition`` in column form, float ``x, y``; in file order.
    """
    wanted = set(conditions)
    rows = []
    for row, rec in _records(df):
        study, series = _as_int(rec["study_id"]), _as_int(rec["series_id"])
        if study is None and series is None and pd.isna(rec["condition"]):
            continue  # blank line
        where = dict(study_id=study, series_id=series, file=file, row=row)
        title = str(rec["condition"]).strip()
        if title not in TITLE_TO_CONDITION:
            problems.append(Problem.skipped(kind="unknown_condition", **where,
                                            message=f"condition {title!r} is not one of the five"))
            continue
        if TITLE_TO_CONDITION[title] not in wanted:
            continue
        point = _point(rec, where, problems)
        if point is not None:
            rows.append((study, series, point[0], TITLE_TO_CONDITION[title], *point[1:], row))
    out = pd.DataFrame(rows, columns=list(POINT_COLUMNS))
    return out.astype({c: "int64" for c in POINT_COLUMNS if c not in ("condition", "x", "y")})


def _point(rec: dict, where: dict, problems: list[Problem]
           ) -> tuple[int, int, float, float] | None:
    """(instance, level_idx, x, y) of one coordinate row; None (and a Problem) if unusable."""
    level = str(rec["level"]).strip()
    instance = _as_int(rec["instance_number"])
    x, y = pd.to_numeric(rec["x"], errors="coerce"), pd.to_numeric(rec["y"], errors="coerce")
    bad = None
    if where["study_id"] is None or where["series_id"] is None or instance is None:
        bad = ("bad_coordinate_row", "study_id, series_id or instance_number is not an integer")
    elif level not in LEVEL_TITLE_TO_INDEX:
        bad = ("unknown_level", f"level {level!r} is not one of L1/L2 .. L5/S1")
    elif not (math.isfinite(x) and math.isfinite(y)):
        bad = ("missing_coordinate", f"x, y = {rec['x']!r}, {rec['y']!r}")
    elif x < 0 or y < 0:
        bad = ("coordinate_out_of_image", f"negative coordinate ({x}, {y})")
    if bad:
        problems.append(Problem.skipped(kind=bad[0], message=bad[1], **where))
        return None
    return instance, LEVEL_TITLE_TO_INDEX[level], float(x), float(y)


def _join(data_dir: Path, condition: str, points: pd.DataFrame, labels: dict[tuple[int, int], int],
          descriptions: dict[int, str], problems: list[Problem], file: str = COORDINATES_CSV
          ) -> list[dict]:
    """Match points with labels and series; unmatched labels/points are Problems."""
    expected = CONDITION_SERIES[condition]
    out, seen = [], set()
    points, left_out = _resolve_duplicate_points(points, condition, problems, file)
    seen.update(left_out)  # their labels are not reported again as lacking a point
    for c in points.to_dict("records"):
        study, series, li = c["study_id"], c["series_id"], c["level_idx"]
        where = dict(study_id=study, series_id=series, file=file, row=c["row"])
        seen.add((study, li))
        desc = _usable_series(data_dir, c, labels, descriptions, where, problems)
        if desc is None:
            continue
        if desc != expected:
            problems.append(Problem.warning(kind="unexpected_series_type", **where,
                                            message=f"{condition} labeled on {desc!r}, "
                                                    f"expected {expected!r}"))
        out.append(dict(study_id=study, series_id=series, instance_number=c["instance_number"],
                        x=c["x"], y=c["y"], condition=condition, level=LEVELS[li],
                        level_idx=li, label=labels[(study, li)], series_description=desc))
    for study, li in sorted(set(labels) - seen):
        problems.append(Problem.skipped(kind="no_coordinates", study_id=study, file=TRAIN_CSV,
                                        message=f"label for {LEVELS[li]} has no point in "
                                                f"{file}"))
    return out


def _resolve_duplicate_points(points: pd.DataFrame, condition: str, problems: list[Problem],
                              file: str = COORDINATES_CSV
                              ) -> tuple[pd.DataFrame, list[tuple[int, int]]]:
    """One point per (study, level): identical repeats kept once, disagreeing ones dropped.

    Rows that disagree (another series, instance or x/y) are never resolved by order: the
    level is left out, with a Problem naming both rows.

    Returns:
        The points kept, and the (study, level_idx) cells left out.
    """
    key = ["study_id", "level_idx"]
    dup = points.duplicated(key, keep=False)
    if not dup.any():
        return points, []
    drop, left_out = [], []
    for (study, li), group in points[dup].groupby(key, sort=True):
        first = group.iloc[0]
        same = (group[["series_id", "instance_number", "x", "y"]]
                == first[["series_id", "instance_number", "x", "y"]]).all(axis=None)
        rows = " and ".join(str(r) for r in group["row"])
        for _, g in group.iloc[1:].iterrows():
            where = dict(study_id=int(study), series_id=int(g["series_id"]),
                         file=file, row=int(g["row"]))
            if same:
                problems.append(Problem.warning(
                    kind="duplicate_coordinate", **where,
                    message=f"rows {rows} repeat the same {condition} {LEVELS[li]} point; "
                            "used once"))
            else:
                problems.append(Problem.skipped(
                    kind="duplicate_coordinate", **where,
                    message=f"rows {rows} give different {condition} {LEVELS[li]} points; "
                            "the level is left out (fix the CSV)"))
        drop += list(group.index[1:] if same else group.index)
        if not same:
            left_out.append((int(study), int(li)))
    return points.drop(index=drop), left_out


def _usable_series(data_dir: Path, point: dict, labels: dict[tuple[int, int], int],
                   descriptions: dict[int, str], where: dict, problems: list[Problem]
                   ) -> str | None:
    """The description of a point's series; None (and a Problem) if the point is unusable."""
    study, series, li = point["study_id"], point["series_id"], point["level_idx"]
    if (study, li) not in labels:
        # Either an empty label (already reported) or a study absent from train.csv.
        problems.append(Problem.skipped(kind="no_label", **where,
                                        message=f"no usable {TRAIN_CSV} label for {LEVELS[li]}"))
        return None
    desc = descriptions.get(series)
    if desc is None:
        problems.append(Problem.skipped(
            kind="unknown_series", **where,
            message=f"series {series} is not in {series_descriptions_csv(LABELLED_SPLIT)}"))
        return None
    if not series_folder(data_dir, study, series).is_dir():
        problems.append(Problem.skipped(
            kind="missing_series", **where,
            message=f"folder {images_dir_name(LABELLED_SPLIT)}/{study}/{series} not found"))
        return None
    return desc


def build_index(data_dir: str | Path, condition: str = CONDITIONS[0], *,
                coordinates: pd.DataFrame | None = None, coordinates_file: str = COORDINATES_CSV
                ) -> tuple[pd.DataFrame, list[Problem]]:
    """The sample index of one condition.

    Args:
        data_dir: folder with ``train.csv``, ``train_label_coordinates.csv``,
            ``train_series_descriptions.csv`` and ``train_images/``.
        condition: one of ``constants.CONDITIONS``.
        coordinates: points to centre the crops on instead of the labelled ones (a
            ``train_label_coordinates.csv``-format frame, e.g. predicted out of fold);
            labels without a point there are left out (``no_coordinates``).
        coordinates_file: the name problems give those points.

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
    label_rows = read_train_labels(data_dir, problems, (condition,))
    labels = {(r["study_id"], r["level_idx"]): r["label"]
              for r in label_rows.to_dict("records")}
    descriptions = read_series_descriptions(data_dir, problems)
    if coordinates is None:
        points = read_coordinates(data_dir, problems, (condition,))
    else:
        points = coordinate_points(coordinates, problems, (condition,), coordinates_file)
    rows = _join(data_dir, condition, points, labels, descriptions, problems, coordinates_file)
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    index = index.sort_values(["study_id", "level_idx"], kind="stable").reset_index(drop=True)
    for col in ("study_id", "series_id", "instance_number", "level_idx", "label"):
        index[col] = index[col].astype("int64")
    index[["x", "y"]] = index[["x", "y"]].astype("float64")
    return index, problems
