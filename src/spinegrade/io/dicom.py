"""Read one DICOM series folder into spatially ordered stacks of slices. numpy + pydicom only.

The reader returns raw modality values plus metadata and leaves normalisation to ``data/``
(STYLE.md principle 4); reading one file (header, pixel mapping, decoding) is
``io.dicom_file``.

Slices are ordered by ImagePositionPatient projected on the slice normal (row x column of
ImageOrientationPatient), never by InstanceNumber. A folder whose slices have different
orientations is split into stacks: slices whose normals point mostly along the same patient
axis (L-R, A-P or S-I) form one stack, so the per-disc tilted blocks of an axial series stay
together while a sagittal stack and an axial stack in one series are separated.

A file that cannot be used (empty, truncated, not DICOM, no pixel data, multi-frame, colour)
is skipped and listed in ``Volume.problems`` (kind ``unreadable_file``); inconsistencies of
the folder or a file are listed as warnings (kind ``series_warning``). Only a folder with
nothing readable raises ``SeriesReadError``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from spinegrade.errors import UserError
from spinegrade.io import geometry
from spinegrade.io.dicom_file import (
    LazySlices,
    SliceHeader,
    UnusableFileError,
    decode_pixels,
    pixel_data_shortfall,
    read_header,
)
from spinegrade.problems import Problem


class SeriesReadError(UserError):
    """A series folder holds no readable DICOM image."""


@dataclass
class Volume:
    """One stack of parallel slices of a series, in spatial order (ascending along ``normal``).

    ``slices`` is empty when the stack was read without pixels (``load_pixels=False``), a
    :class:`LazySlices` decoding on access with ``lazy_pixels=True``, a list otherwise; every
    other per-slice array has one row per slice in the same order.
    """

    slices: Sequence[np.ndarray]  # float32 2-D, rescaled, MONOCHROME1 inverted; shapes may differ
    instance_numbers: np.ndarray  # (n,) int
    positions: np.ndarray         # (n, 3) ImagePositionPatient, mm; NaN without geometry
    normal_positions: np.ndarray  # (n,) IPP . normal, ascending; NaN without geometry
    orientation: np.ndarray       # (6,) IOP shared by most slices
    normal: np.ndarray            # (3,) row x column of ``orientation``
    pixel_spacing: np.ndarray     # (n, 2) (row, column) spacing, mm; NaN where absent
    windows: np.ndarray           # (n, 2) (center, width) on the returned value scale; NaN
    series_instance_uid: str
    series_description: str
    transfer_syntax: str          # name, e.g. "JPEG 2000 Image Compression (Lossless Only)"
    path: Path
    problems: list[Problem] = field(default_factory=list)
    shapes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    files: list[Path] = field(default_factory=list)  # (n,) source file of each slice
    transfer_syntax_uid: str = ""
    # Anatomy as the header of the stack's first slice names it ("" when absent).
    body_part_examined: str = ""
    study_description: str = ""
    protocol_name: str = ""
    # (n, 6) each slice's own ImageOrientationPatient (tilted per-disc blocks of one stack
    # differ from ``orientation``); None when not read.
    orientations: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.instance_numbers)

    def slice_orientation(self, j: int) -> np.ndarray:
        """(6,) ImageOrientationPatient of slice ``j``: its own where read, else the stack's."""
        return self.orientation if self.orientations is None else self.orientations[j]

    def patient_point(self, j: int, x: float, y: float) -> np.ndarray:
        """Patient coordinates (mm, LPS) of pixel (x, y) on slice ``j``, in its own plane."""
        return geometry.pixel_to_patient(self.positions[j], self.slice_orientation(j),
                                         self.pixel_spacing[j], x, y)

    def index_of(self, instance_number: int) -> int:
        """Position in the stack of a slice given by InstanceNumber; KeyError if absent."""
        hits = np.flatnonzero(self.instance_numbers == int(instance_number))
        if hits.size == 0:
            raise KeyError(f"instance {instance_number} is not in {self.path}")
        return int(hits[0])

    @property
    def orientation_label(self) -> str:
        """'SAG', 'COR', 'AX', 'oblique' or 'unknown' (see ``geometry.orientation_label``)."""
        return geometry.orientation_label(self.normal)

    @property
    def slice_spacing(self) -> float:
        """Median gap between slices along the normal, mm (NaN without geometry)."""
        return geometry.slice_spacing(self.normal_positions)

    @property
    def instance_order(self) -> str:
        """How InstanceNumber runs along the stack: 'ascending', 'descending' or 'shuffled'."""
        diffs = np.diff(self.instance_numbers)
        if np.all(diffs >= 0):
            return "ascending"
        if np.all(diffs <= 0):
            return "descending"
        return "shuffled"

    @property
    def instance_order_matches(self) -> bool:
        """True when ascending InstanceNumber is also ascending position along the normal."""
        return self.instance_order == "ascending"

    def array(self) -> np.ndarray:
        """The slices stacked as (n, rows, columns) float32; ValueError if shapes differ."""
        if not self.slices:
            raise ValueError(f"{self.path}: read without pixels (load_pixels=False)")
        if len({s.shape for s in self.slices}) > 1:
            raise ValueError(f"{self.path}: slices have different shapes; resize them first")
        return np.stack(self.slices)


# --- Folder -> headers -> stacks ----------------------------------------------------------------


def _unusable(path: str | Path, reason: str) -> Problem:
    """A file left out of every stack (the caller adds study and series)."""
    return Problem.skipped(kind="unreadable_file", file=str(path), message=reason)


def _note(path: str | Path, reason: str) -> Problem:
    """An oddity of a file that was kept, or of the whole folder."""
    return Problem.warning(kind="series_warning", file=str(path), message=reason)


def _natural_key(path: Path) -> tuple[int, int | str]:
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.name)


def list_files(series_dir: str | Path) -> list[Path]:
    """Regular, non-hidden files directly in ``series_dir``, numeric names in numeric order."""
    with os.scandir(series_dir) as it:
        files = [Path(e.path) for e in it if e.is_file() and not e.name.startswith(".")]
    return sorted(files, key=_natural_key)


def _read_headers(files: Iterable[Path], with_pixels: bool
                  ) -> tuple[list[SliceHeader], dict[Path, Dataset], list[Problem]]:
    headers: list[SliceHeader] = []
    datasets: dict[Path, Dataset] = {}
    problems: list[Problem] = []
    for path in files:
        try:
            header, ds, notes = read_header(path, with_pixels=with_pixels)
        except UnusableFileError as e:
            problems.append(_unusable(path, str(e)))
            continue
        except OSError as e:
            problems.append(_unusable(path, f"cannot open ({e.strerror or e})"))
            continue
        headers.append(header)
        problems.extend(_note(path, n) for n in notes)
        if with_pixels:
            datasets[path] = ds
    return headers, datasets, problems


def _split_stacks(headers: Sequence[SliceHeader]) -> list[list[SliceHeader]]:
    """Group slices by the dominant axis of their normal; slices without geometry apart.

    Returned largest first (ties: SAG, COR, AX, then the no-geometry group).
    """
    groups: dict[int, list[SliceHeader]] = {}
    for h in headers:
        key = geometry.dominant_axis(geometry.slice_normal(h.orientation)) if h.has_geometry else 3
        groups.setdefault(key, []).append(h)
    return [groups[k] for k in sorted(groups, key=lambda k: (-len(groups[k]), k))]


def _reference_orientation(headers: Sequence[SliceHeader]) -> np.ndarray:
    """The IOP most slices share (rounded to 1e-4 to absorb float noise in the tag)."""
    geo = [h for h in headers if h.has_geometry]
    if not geo:
        return np.full(6, np.nan)
    counts = Counter(tuple(np.round(h.orientation, 4)) for h in geo)
    best = counts.most_common(1)[0][0]
    return next(h.orientation for h in geo if tuple(np.round(h.orientation, 4)) == best)


def _stack_problems(where: str, headers: Sequence[SliceHeader], normal: np.ndarray,
                    normal_positions: np.ndarray) -> list[Problem]:
    """Inconsistencies within one ordered stack, each reported once for the folder."""
    notes: list[str] = []
    inst = np.array([h.instance_number for h in headers])
    if not np.all(np.isfinite(normal)):
        notes.append(f"{len(headers)} slices without ImagePositionPatient/"
                     "ImageOrientationPatient: ordered by InstanceNumber")
    else:
        for idx in geometry.duplicate_groups(normal_positions):
            notes.append(f"instances {inst[idx].tolist()} share the position "
                         f"{normal_positions[idx[0]]:.3f} mm along the normal; kept in "
                         "InstanceNumber order")
        normals = np.stack([geometry.slice_normal(h.orientation) for h in headers])
        angle = geometry.max_angle_deg(normals, normal)
        if angle > geometry.PARALLEL_TOLERANCE_DEG:
            notes.append(f"slices are not parallel (normals differ by up to {angle:.1f} deg);"
                         " ordered along the most common orientation")
    values, counts = np.unique(inst, return_counts=True)
    if np.any(counts > 1):
        notes.append(f"duplicate InstanceNumber {values[counts > 1].tolist()}; "
                     "index_of returns the first")
    shapes = Counter((h.rows, h.columns) for h in headers)
    if len(shapes) > 1:
        listed = ", ".join(f"{r}x{c} ({n})" for (r, c), n in shapes.most_common())
        notes.append(f"slices of different shapes: {listed}")
    missing = sum(not np.all(np.isfinite(h.pixel_spacing)) for h in headers)
    if missing:
        notes.append(f"{missing} slices without PixelSpacing")
    return [_note(where, n) for n in notes]


def _build_volume(series_dir: Path, headers: Sequence[SliceHeader],
                  slices: dict[Path, np.ndarray] | LazySlices | None,
                  problems: list[Problem]) -> Volume:
    """Order one stack spatially and gather its per-slice metadata into a Volume."""
    orientation = _reference_orientation(headers)
    normal = geometry.slice_normal(orientation)
    inst = np.array([h.instance_number for h in headers], dtype=np.int64)
    positions = np.stack([h.position for h in headers])
    if np.all(np.isfinite(normal)):
        normal_positions = positions @ normal
        order = geometry.spatial_order(normal_positions, inst)
    else:
        normal_positions = np.full(len(headers), np.nan)
        order = np.argsort(inst, kind="stable")
    ordered = [headers[i] for i in order]
    normal_positions = normal_positions[order]
    syntaxes = Counter(h.transfer_syntax_uid for h in ordered)
    main_syntax = syntaxes.most_common(1)[0][0]
    if isinstance(slices, LazySlices):
        ordered_slices: Sequence[np.ndarray] = LazySlices(ordered, slices._datasets)
    else:
        ordered_slices = [slices[h.path] for h in ordered] if slices is not None else []
    return Volume(
        slices=ordered_slices,  # type: ignore[arg-type]
        instance_numbers=inst[order],
        positions=positions[order],
        normal_positions=normal_positions,
        orientation=orientation,
        normal=normal,
        pixel_spacing=np.stack([h.pixel_spacing for h in ordered]),
        windows=np.stack([h.mapping.window(*h.window) for h in ordered]),
        series_instance_uid=ordered[0].series_instance_uid,
        series_description=ordered[0].series_description,
        transfer_syntax=" + ".join(UID(u).name for u, _ in syntaxes.most_common()),
        path=series_dir,
        problems=list(problems) + _stack_problems(str(series_dir), ordered, normal,
                                                  normal_positions),
        shapes=np.array([(h.rows, h.columns) for h in ordered], dtype=np.int64),
        files=[h.path for h in ordered],
        transfer_syntax_uid=main_syntax,
        body_part_examined=ordered[0].body_part_examined,
        study_description=ordered[0].study_description,
        protocol_name=ordered[0].protocol_name,
        orientations=np.stack([h.orientation for h in ordered]),
    )


def _decode_stack(headers: Sequence[SliceHeader], datasets: dict[Path, Dataset],
                  problems: list[Problem]) -> tuple[list[SliceHeader], dict[Path, np.ndarray]]:
    """Decode each slice once; slices that fail are dropped and reported."""
    kept: list[SliceHeader] = []
    slices: dict[Path, np.ndarray] = {}
    for h in headers:
        try:
            slices[h.path] = decode_pixels(datasets.pop(h.path), h)
        except Exception as e:  # a decoder may raise anything on damaged data; skip the slice
            problems.append(_unusable(h.path, f"cannot decode pixels ({type(e).__name__}: {e})"))
            continue
        kept.append(h)
    return kept, slices


def _check_stack(headers: Sequence[SliceHeader], datasets: dict[Path, Dataset],
                 problems: list[Problem]) -> tuple[list[SliceHeader], LazySlices]:
    """Keep decoding for later; drop only the slices a cheap check shows to be broken.

    An uncompressed file with too few PixelData bytes is decoded now, so it is dropped and
    reported with the same reason as by an eager read.
    """
    suspect = [h for h in headers if pixel_data_shortfall(datasets[h.path], h)]
    dropped = set()
    if suspect:
        kept, _ = _decode_stack(suspect, datasets, problems)
        dropped = {h.path for h in suspect} - {h.path for h in kept}
    headers = [h for h in headers if h.path not in dropped]
    return headers, LazySlices(headers, datasets)


def _scan(series_dir: str | Path, load_pixels: bool
          ) -> tuple[Path, list[list[SliceHeader]], dict[Path, Dataset], list[Problem]]:
    """Read every file's header once and split the folder into stacks."""
    folder = Path(series_dir)
    if not folder.is_dir():
        raise SeriesReadError(f"{folder}: not a folder; pass a series folder of DICOM files")
    files = list_files(folder)
    if not files:
        raise SeriesReadError(f"{folder}: no files; pass a series folder of DICOM files")
    headers, datasets, problems = _read_headers(files, with_pixels=load_pixels)
    if not headers:
        reasons = Counter(p.message for p in problems).most_common(3)
        summary = "; ".join(f"{r} ({n})" for r, n in reasons)
        raise SeriesReadError(f"{folder}: none of its {len(files)} files is a readable DICOM "
                              f"image: {summary}")
    return folder, _split_stacks(headers), datasets, problems


def _raise_if_empty(folder: Path, headers: Sequence[SliceHeader], problems: list[Problem]) -> None:
    if not headers:
        reasons = "; ".join(f"{Path(p.file).name}: {p.message}" for p in problems[:3])
        raise SeriesReadError(f"{folder}: no slice could be decoded: {reasons}")


def read_stacks(series_dir: str | Path, *, load_pixels: bool = True) -> list[Volume]:
    """Every stack of a series folder, largest first, each in spatial order.

    Args:
        series_dir: a folder of DICOM files (one series).
        load_pixels: decode the pixels; ``False`` reads headers only (fast: for ``inspect``),
            leaving ``Volume.slices`` empty and not checking that pixel data is present.

    Returns:
        One Volume per stack; each carries the folder's unreadable-file problems too.

    Raises:
        SeriesReadError: the folder is missing or holds no readable DICOM image.
    """
    folder, stacks, datasets, problems = _scan(series_dir, load_pixels)
    if len(stacks) > 1:
        problems.append(_note(folder, _stacks_note(stacks)))
    decoded: list[tuple[list[SliceHeader], dict[Path, np.ndarray] | None]] = []
    for headers in stacks:
        slices = None
        if load_pixels:
            headers, slices = _decode_stack(headers, datasets, problems)
        if headers:
            decoded.append((headers, slices))
    if not decoded:
        _raise_if_empty(folder, [], problems)
    return [_build_volume(folder, h, s, problems) for h, s in decoded]


def _choose(stacks: list[list[SliceHeader]], wanted: Sequence[int] | None) -> int:
    """Index of the stack holding most of ``wanted`` instance numbers (ties: the larger)."""
    if not wanted:
        return 0
    want = {int(i) for i in wanted}
    scores = [(sum(h.instance_number in want for h in s), len(s)) for s in stacks]
    return max(range(len(stacks)), key=lambda i: scores[i])


def read_series(series_dir: str | Path, instance_numbers: Sequence[int] | None = None, *,
                load_pixels: bool = True, lazy_pixels: bool = False) -> Volume:
    """The stack of a series folder that the labels refer to, in spatial order.

    Args:
        series_dir: a folder of DICOM files (one series).
        instance_numbers: instance numbers the caller needs (e.g. its label rows); the stack
            holding most of them is chosen. ``None``: the largest stack.
        load_pixels: decode the pixels of the chosen stack (each file is read once); ``False``
            reads headers only.
        lazy_pixels: with ``load_pixels``, read every file once but decode a slice only when
            ``Volume.slices[j]`` is first accessed (:class:`LazySlices`). Truncated
            uncompressed files are still found (PixelData shorter than the header says) and
            dropped as in an eager read; a compressed file that fails to decode raises
            :class:`PixelDecodeError` on access instead (read again eagerly to drop it).

    Returns:
        The chosen stack. Its ``problems`` list skipped files, inconsistencies, the stacks not
        chosen and any requested instance number it lacks.

    Raises:
        SeriesReadError: the folder is missing or nothing in it is readable.
    """
    folder, stacks, datasets, problems = _scan(series_dir, load_pixels)
    chosen = _choose(stacks, instance_numbers)
    headers = stacks[chosen]
    if len(stacks) > 1:
        problems.append(_note(folder, f"{_stacks_note(stacks)}; read "
                                      f"{_stack_label(headers)} ({len(headers)} slices)"))
    slices: dict[Path, np.ndarray] | LazySlices | None = None
    if load_pixels and lazy_pixels:
        headers, slices = _check_stack(headers, datasets, problems)
        _raise_if_empty(folder, headers, problems)
    elif load_pixels:
        headers, slices = _decode_stack(headers, datasets, problems)
        _raise_if_empty(folder, headers, problems)
    if instance_numbers is not None:
        have = {h.instance_number for h in headers}
        missing = sorted({int(i) for i in instance_numbers} - have)
        if missing:
            problems.append(_note(folder, f"requested instance numbers {missing} are not in "
                                          "the stack read"))
    return _build_volume(folder, headers, slices, problems)


def _stacks_note(stacks: Sequence[Sequence[SliceHeader]]) -> str:
    listed = ", ".join(f"{_stack_label(s)} ({len(s)} slices)" for s in stacks)
    return f"folder holds {len(stacks)} stacks of different orientations: {listed}"


def _stack_label(headers: Sequence[SliceHeader]) -> str:
    return geometry.orientation_label(geometry.slice_normal(_reference_orientation(headers)))


def find_series_dirs(root: str | Path) -> list[Path]:
    """Series folders under ``root`` (itself included): folders holding at least one file.

    Works on a series folder, a study folder or a dataset's ``*_images`` folder.
    """
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") for f in filenames):
            found.append(Path(dirpath))
    return sorted(found, key=lambda p: [_natural_key(Path(part)) for part in p.parts])
