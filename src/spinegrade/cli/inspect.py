"""``spinegrade inspect``: one line per stack of every DICOM series under a path (headers only)."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from pydicom import uid as dicom_uid
from tqdm import tqdm

from spinegrade.errors import UserError
from spinegrade.io.dicom import SeriesReadError, Volume, find_series_dirs, read_stacks

# Short transfer syntax names for the table (``--json`` keeps the full DICOM names).
_SHORT_SYNTAX: dict[str, str] = {
    dicom_uid.ImplicitVRLittleEndian: "implicit LE",
    dicom_uid.ExplicitVRLittleEndian: "explicit LE",
    dicom_uid.ExplicitVRBigEndian: "explicit BE",
    dicom_uid.RLELossless: "RLE",
    dicom_uid.JPEGLSLossless: "JPEG-LS lossless",
    dicom_uid.JPEGLSNearLossless: "JPEG-LS near-lossless",
    dicom_uid.JPEG2000Lossless: "JPEG 2000 lossless",
    dicom_uid.JPEG2000: "JPEG 2000",
    dicom_uid.JPEGLosslessSV1: "JPEG lossless SV1",
    dicom_uid.JPEGLossless: "JPEG lossless",
    dicom_uid.JPEGBaseline8Bit: "JPEG baseline",
    dicom_uid.JPEGExtended12Bit: "JPEG extended",
}
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("series", "series"), ("description", "description"), ("orient", "orientation"),
    ("slices", "n_slices"), ("matrix", "matrix"), ("pixel mm", "pixel"), ("gap mm", "gap"),
    ("transfer syntax", "syntax"), ("instance order", "order"), ("problems", "n_problems"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="summarise the DICOM series under a folder (one line per stack)",
        description=(
            "Read the headers of every series under PATH (a series folder, a study folder or a "
            "dataset's images folder) and print one line per stack: description, orientation "
            "(SAG/COR/AX from the slice normal's dominant axis; 'oblique' when its largest "
            "component is below 0.8, i.e. tilted more than ~37 degrees), slice count, matrix, "
            "pixel spacing, slice spacing (median gap along the normal), transfer syntax, "
            "whether InstanceNumber runs in spatial order, and the problems found."
        ),
    )
    p.add_argument("path", type=Path, help="series, study or images folder")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list with one object per stack instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    records = inspect_path(args.path)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(format_table(records, args.path))
    return 0


def inspect_path(path: str | Path, *, progress: bool = True) -> list[dict]:
    """One summary dict per stack of every series folder under ``path`` (headers only).

    Raises:
        UserError: ``path`` does not exist, is a file, or holds no files.
    """
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: no such folder; pass a series, study or images folder")
    if not root.is_dir():
        raise UserError(f"{root}: is a file; pass the folder that holds it")
    series_dirs = find_series_dirs(root)
    if not series_dirs:
        raise UserError(f"{root}: holds no files; pass a series, study or images folder")
    records: list[dict] = []
    bar = tqdm(series_dirs, desc="inspect", unit="series",
               disable=not progress or len(series_dirs) < 2)
    for series_dir in bar:
        try:
            records.extend(summarise(v) for v in read_stacks(series_dir, load_pixels=False))
        except SeriesReadError as e:
            records.append(_unreadable(series_dir, str(e)))
    return records


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def summarise(volume: Volume) -> dict:
    """The ``--json`` object of one stack."""
    shape = Counter(map(tuple, volume.shapes.tolist())).most_common(1)[0][0]
    spacing = np.nanmedian(volume.pixel_spacing, axis=0) if np.isfinite(
        volume.pixel_spacing).any() else np.full(2, np.nan)
    return {
        "path": str(volume.path),
        "series_instance_uid": volume.series_instance_uid,
        "series_description": volume.series_description,
        "orientation": volume.orientation_label,
        "n_slices": len(volume),
        "rows": int(shape[0]),
        "columns": int(shape[1]),
        "shapes": sorted({tuple(s) for s in volume.shapes.tolist()}),
        "pixel_spacing": [_none_if_nan(s) for s in spacing],
        "slice_spacing": _none_if_nan(volume.slice_spacing),
        "transfer_syntax": volume.transfer_syntax,
        "transfer_syntax_uid": volume.transfer_syntax_uid,
        "instance_order": volume.instance_order,
        "instance_order_matches": volume.instance_order_matches,
        "instances_in_spatial_order": volume.instance_numbers.tolist(),
        "problems": [{"file": p.file, "reason": p.message} for p in volume.problems],
    }


def _unreadable(series_dir: Path, message: str) -> dict:
    return {
        "path": str(series_dir), "series_instance_uid": "", "series_description": "",
        "orientation": "unreadable", "n_slices": 0, "rows": None, "columns": None, "shapes": [],
        "pixel_spacing": [None, None], "slice_spacing": None, "transfer_syntax": "",
        "transfer_syntax_uid": "", "instance_order": "", "instance_order_matches": False,
        "instances_in_spatial_order": [],
        "problems": [{"file": str(series_dir), "reason": message}],
    }


def _cells(record: dict, root: Path) -> dict[str, str]:
    """Table cells of one record, as strings."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rel = Path(record["path"]).relative_to(root) if record["path"] != str(root) else Path(".")
    shapes = record["shapes"]
    matrix = "-" if not shapes else " ".join(f"{r}x{c}" for r, c in shapes)
    order = {"ascending": "matches", "descending": "reversed"}.get(record["instance_order"],
                                                                   record["instance_order"])
    return {
        "series": str(rel), "description": record["series_description"] or "-",
        "orientation": record["orientation"], "n_slices": str(record["n_slices"]),
        "matrix": matrix, "pixel": "x".join(num(s) for s in record["pixel_spacing"]) if record["n_slices"] else "-",
        "gap": num(record["slice_spacing"]),
        "syntax": _SHORT_SYNTAX.get(record["transfer_syntax_uid"], record["transfer_syntax"])
        or "-",
        "order": order or "-", "n_problems": str(len(record["problems"])),
    }


def format_table(records: list[dict], root: str | Path) -> str:
    """A padded text table (one line per stack), then each problem on its own line."""
    root = Path(root)
    rows = [_cells(r, root) for r in records]
    widths = {key: max([len(title)] + [len(row[key]) for row in rows]) for title, key in _COLUMNS}
    lines = ["  ".join(title.ljust(widths[key]) for title, key in _COLUMNS).rstrip()]
    lines += ["  ".join(row[key].ljust(widths[key]) for _, key in _COLUMNS).rstrip()
              for row in rows]
    # dict.fromkeys: a series split into stacks repeats its file problems in each stack.
    problems = dict.fromkeys((cells["series"], _where(p["file"], r["path"]), p["reason"])
                             for cells, r in zip(rows, records, strict=True)
                             for p in r["problems"])
    if problems:
        lines += ["", "problems:"]
        lines += [f"  {series}: {where}{reason}" for series, where, reason in problems]
    return "\n".join(lines)


def _where(file: str, series_path: str) -> str:
    """The file's name as a prefix, or nothing for a problem of the whole series."""
    return "" if file == series_path else f"{Path(file).name}: "
