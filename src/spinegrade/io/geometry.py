"""Slice geometry from DICOM patient coordinates (LPS, millimetres). Pure numpy.

DICOM places every slice with ImagePositionPatient (IPP, the centre of the first pixel) and
ImageOrientationPatient (IOP, the row and column direction cosines). The slice normal is
``row x column``; a slice's position along the stack is ``IPP . normal``. Sorting by that
projection is the only reliable spatial order: InstanceNumber is not (FACTS.md).

The second half maps between pixels and patient points and finds, for a 3D point (a disc
located on a sagittal series), the slice of a study's axial stacks whose own plane is nearest
(``locate_point``), tilted per-disc blocks included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A stack is "oblique" when no patient axis clearly dominates its normal: the largest
# component below 0.8 means the plane is tilted more than ~37 degrees from every
# standard plane (cos 37 deg = 0.8).
OBLIQUE_THRESHOLD = 0.8
# Patient axis (L-R, A-P, S-I) the normal points along -> plane name.
AXIS_LABELS: tuple[str, ...] = ("SAG", "COR", "AX")
# Positions closer than this along the normal (mm) count as the same position.
POSITION_TOLERANCE_MM = 1e-3
# Normals further apart than this (degrees) within one stack are reported as non-parallel.
PARALLEL_TOLERANCE_DEG = 1.0


def slice_normal(iop: np.ndarray) -> np.ndarray:
    """Unit normal ``row x column`` of one ImageOrientationPatient.

    Args:
        iop: (6,) row direction cosines followed by column direction cosines.

    Returns:
        (3,) unit vector; NaN when the IOP is degenerate (row parallel to column).
    """
    iop = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:6])
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm < 1e-6:
        return np.full(3, np.nan)
    return normal / norm


def dominant_axis(normal: np.ndarray) -> int:
    """Index (0 = L-R, 1 = A-P, 2 = S-I) of the patient axis the normal points most along."""
    return int(np.argmax(np.abs(normal)))


def orientation_label(normal: np.ndarray) -> str:
    """'SAG', 'COR' or 'AX' from the normal's dominant axis; 'oblique' or 'unknown' otherwise.

    'oblique' when the largest absolute component is below ``OBLIQUE_THRESHOLD``;
    'unknown' when the normal is not finite (no geometry in the files).
    """
    normal = np.asarray(normal, dtype=np.float64)
    if normal.shape != (3,) or not np.all(np.isfinite(normal)):
        return "unknown"
    if np.max(np.abs(normal)) < OBLIQUE_THRESHOLD:
        return "oblique"
    return AXIS_LABELS[dominant_axis(normal)]


def spatial_order(normal_positions: np.ndarray, instance_numbers: np.ndarray) -> np.ndarray:
    """Indices that sort slices by position along the normal, ties by instance number.

    Positions within ``POSITION_TOLERANCE_MM`` are ties, so duplicate positions keep a stable,
    reproducible order (ascending instance number) instead of float noise deciding it.
    """
    pos = np.asarray(normal_positions, dtype=np.float64)
    key = np.round(pos / POSITION_TOLERANCE_MM)
    return np.lexsort((np.asarray(instance_numbers), key))


def duplicate_groups(normal_positions: np.ndarray) -> list[np.ndarray]:
    """Groups (index arrays, len >= 2) of slices that share a position along the normal."""
    key = np.round(np.asarray(normal_positions, dtype=np.float64) / POSITION_TOLERANCE_MM)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts > 1)]


def slice_spacing(normal_positions: np.ndarray) -> float:
    """Median gap (mm) between consecutive distinct positions along the normal; NaN if < 2.

    Computed from positions because SpacingBetweenSlices and SliceThickness are missing or
    wrong in part of the real data (FACTS.md).
    """
    pos = np.sort(np.asarray(normal_positions, dtype=np.float64))
    pos = pos[np.isfinite(pos)]
    gaps = np.diff(pos)
    gaps = gaps[gaps > POSITION_TOLERANCE_MM]
    return float(np.median(gaps)) if gaps.size else float("nan")


def max_angle_deg(normals: np.ndarray, reference: np.ndarray) -> float:
    """Largest angle (degrees) between any of ``normals`` (n, 3) and ``reference`` (3,)."""
    cos = np.clip(np.abs(np.asarray(normals) @ np.asarray(reference)), 0.0, 1.0)
    return float(np.degrees(np.arccos(cos.min()))) if cos.size else 0.0


# --- Pixels <-> patient coordinates, and points -> slices -------------------------------------

# A point farther than this many slice gaps from the nearest slice plane is not in the stack
# (half a gap is the most a point between two slices can be; 1.5 gaps allows one slice of
# extrapolation beyond either end for localisation error).
MAX_DISTANCE_FACTOR = 1.5
# Gap assumed for a slice with no parallel neighbour to measure it from: a typical lumbar
# axial T2 spacing (3.5-4.5 mm, FACTS.md sizes; SpacingBetweenSlices is not trusted).
FALLBACK_SLICE_GAP_MM = 4.0


def pixel_to_patient(position: np.ndarray, orientation: np.ndarray, pixel_spacing: np.ndarray,
                     x: float | np.ndarray, y: float | np.ndarray) -> np.ndarray:
    """Patient coordinates (mm, LPS) of pixel (x = column, y = row) of one slice.

    Args:
        position: (3,) ImagePositionPatient, the centre of pixel (0, 0).
        orientation: (6,) ImageOrientationPatient: direction of increasing column index,
            then of increasing row index.
        pixel_spacing: (2,) PixelSpacing (between rows, between columns).
        x, y: pixel coordinates (scalars or arrays of one shape).

    Returns:
        (3,) or (..., 3) points.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    sp = np.asarray(pixel_spacing, dtype=np.float64)
    x, y = np.asarray(x, dtype=np.float64)[..., None], np.asarray(y, dtype=np.float64)[..., None]
    return np.asarray(position, dtype=np.float64) + x * sp[1] * iop[:3] + y * sp[0] * iop[3:6]


def patient_to_pixel(point: np.ndarray, position: np.ndarray, orientation: np.ndarray,
                     pixel_spacing: np.ndarray) -> tuple[float, float, float]:
    """Project a patient point into one slice: ``(x = column, y = row, signed distance mm)``.

    The distance is along the slice normal ``row x column`` (positive on the side it points to).
    """
    iop = np.asarray(orientation, dtype=np.float64)
    sp = np.asarray(pixel_spacing, dtype=np.float64)
    d = np.asarray(point, dtype=np.float64) - np.asarray(position, dtype=np.float64)
    return (float(d @ iop[:3] / sp[1]), float(d @ iop[3:6] / sp[0]),
            float(d @ slice_normal(iop)))


def parallel_groups(normals: np.ndarray) -> list[np.ndarray]:
    """Slices whose normals lie within ``PARALLEL_TOLERANCE_DEG`` of a group's first one."""
    cos_tol = np.cos(np.radians(PARALLEL_TOLERANCE_DEG))
    refs: list[np.ndarray] = []
    members: list[list[int]] = []
    for i, n in enumerate(normals):
        for g, ref in enumerate(refs):
            if abs(float(n @ ref)) >= cos_tol:
                members[g].append(i)
                break
        else:
            refs.append(n)
            members.append([i])
    return [np.array(m) for m in members]


@dataclass(frozen=True, eq=False)
class StackGeometry:
    """Every slice plane of one stack, each with its own orientation (tilted blocks allowed).

    Attributes:
        positions: (n, 3) ImagePositionPatient.
        orientations: (n, 6) ImageOrientationPatient of each slice.
        pixel_spacing: (n, 2) (row, column) spacing, mm.
        shapes: (n, 2) (rows, columns), or None when unknown (no in-plane extent check).
        instance_numbers: (n,) InstanceNumber, or None.
    """

    positions: np.ndarray
    orientations: np.ndarray
    pixel_spacing: np.ndarray
    shapes: np.ndarray | None = None
    instance_numbers: np.ndarray | None = None

    @classmethod
    def build(cls, positions: np.ndarray, orientations: np.ndarray, pixel_spacing: np.ndarray,
              shapes: np.ndarray | None = None, instance_numbers: np.ndarray | None = None
              ) -> StackGeometry:
        """Validated arrays; one (6,) orientation is shared by every slice."""
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        n = len(pos)
        iop = np.broadcast_to(np.asarray(orientations, dtype=np.float64), (n, 6)).copy()
        sp = np.broadcast_to(np.asarray(pixel_spacing, dtype=np.float64), (n, 2)).copy()
        shp = None if shapes is None else np.broadcast_to(np.asarray(shapes), (n, 2)).copy()
        inst = None if instance_numbers is None else np.asarray(instance_numbers).reshape(n)
        return cls(pos, iop, sp, shp, inst)

    @classmethod
    def from_volume(cls, volume: object, orientations: np.ndarray | None = None
                    ) -> StackGeometry:
        """From an ``io.dicom.Volume`` (duck-typed: io.dicom imports this module).

        Per-slice ``orientations`` (n, 6) are taken from the argument, else from a
        ``volume.orientations`` attribute, else the volume's shared ``orientation``.
        """
        iop = orientations if orientations is not None else getattr(volume, "orientations", None)
        if iop is None:
            iop = volume.orientation  # type: ignore[attr-defined]
        return cls.build(volume.positions, iop, volume.pixel_spacing,  # type: ignore[attr-defined]
                         getattr(volume, "shapes", None), getattr(volume, "instance_numbers", None))

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def normals(self) -> np.ndarray:
        """(n, 3) unit normal of each slice."""
        if not len(self):
            return np.zeros((0, 3))
        return np.stack([slice_normal(o) for o in self.orientations])

    def gaps(self) -> np.ndarray:
        """(n,) slice spacing of each slice, measured among the slices parallel to it.

        A slice with no parallel neighbour gets the median of the others, else
        ``FALLBACK_SLICE_GAP_MM``.
        """
        normals = self.normals
        out = np.full(len(self), np.nan)
        for idx in parallel_groups(normals):
            out[idx] = slice_spacing(self.positions[idx] @ normals[idx[0]])
        fill = np.nanmedian(out) if np.isfinite(out).any() else FALLBACK_SLICE_GAP_MM
        return np.where(np.isfinite(out), out, fill)

    def project(self, point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per slice: (x, y, signed distance, inside the rows x columns extent) of ``point``."""
        rows = [patient_to_pixel(point, p, o, s) for p, o, s in
                zip(self.positions, self.orientations, self.pixel_spacing, strict=True)]
        x, y, dist = np.array(rows, dtype=np.float64).reshape(-1, 3).T
        if self.shapes is None:
            inside = np.ones(len(self), dtype=bool)
        else:  # pixel centres run 0 .. size - 1; the image reaches half a pixel beyond them
            rows, cols = self.shapes[:, 0], self.shapes[:, 1]
            inside = (x >= -0.5) & (x <= cols - 0.5) & (y >= -0.5) & (y <= rows - 0.5)
        return x, y, dist, inside


@dataclass(frozen=True)
class SliceMatch:
    """Where a patient point falls in a stack.

    Attributes:
        stack: index of the stack in the list searched (0 for ``nearest_slice``).
        slice_index: index of the slice within that stack.
        instance_number: that slice's InstanceNumber (None when the stack has none).
        distance_mm: signed distance from the slice plane along that slice's normal.
        x, y: the point projected into the slice, in pixels (column, row).
        inside: the projection lies within the slice's rows x columns (True if unknown).
    """

    stack: int
    slice_index: int
    instance_number: int | None
    distance_mm: float
    x: float
    y: float
    inside: bool


def _match(stack_index: int, stack: StackGeometry, j: int, x: np.ndarray, y: np.ndarray,
           dist: np.ndarray, inside: np.ndarray) -> SliceMatch:
    inst = None if stack.instance_numbers is None else int(stack.instance_numbers[j])
    return SliceMatch(stack_index, int(j), inst, float(dist[j]), float(x[j]), float(y[j]),
                      bool(inside[j]))


def nearest_slice(point: np.ndarray, stack: StackGeometry) -> SliceMatch:
    """The slice whose own plane is nearest to ``point`` (absolute distance; no extent check).

    Raises:
        ValueError: an empty stack or a point that is not finite.
    """
    if len(stack) == 0 or not np.all(np.isfinite(point)):
        raise ValueError("nearest_slice needs a finite point and at least one slice")
    x, y, dist, inside = stack.project(point)
    j = int(np.nanargmin(np.abs(dist)))
    return _match(0, stack, j, x, y, dist, inside)


def locate_point(point: np.ndarray, stacks: Sequence[StackGeometry], *,
                 max_distance_factor: float = MAX_DISTANCE_FACTOR,
                 max_distance_mm: float | None = None) -> tuple[SliceMatch | None, str | None]:
    """The slice, over several stacks, whose plane is nearest to ``point`` and whose image
    contains its projection.

    Args:
        point: (3,) patient point (mm, LPS), e.g. a disc located on the sagittal series.
        stacks: the study's axial stacks (each may hold tilted blocks).
        max_distance_factor: refuse when the nearest plane is farther than this many of that
            slice's gaps (:meth:`StackGeometry.gaps`).
        max_distance_mm: a fixed tolerance instead of the factor.

    Returns:
        ``(match, None)``, or ``(None, reason)`` when no stack covers the point.
    """
    if not np.all(np.isfinite(np.asarray(point, dtype=np.float64))):
        return None, "no 3D position for this disc"
    best: tuple[float, int, SliceMatch, float] | None = None
    nearest_outside = np.inf
    for s, stack in enumerate(stacks):
        if len(stack) == 0:
            continue
        x, y, dist, inside = stack.project(point)
        ok = inside & np.isfinite(dist)
        nearest_outside = min(nearest_outside, float(np.nanmin(np.abs(dist), initial=np.inf)))
        if not ok.any():
            continue
        j = int(np.flatnonzero(ok)[np.argmin(np.abs(dist[ok]))])
        if best is None or abs(dist[j]) < best[0]:
            gap = float(stack.gaps()[j])
            tol = max_distance_mm if max_distance_mm is not None else max_distance_factor * gap
            best = (abs(float(dist[j])), s, _match(s, stack, j, x, y, dist, inside), tol)
    if best is None:
        where = "no axial stack" if not np.isfinite(nearest_outside) else (
            f"outside the field of view of every axial slice (nearest plane "
            f"{nearest_outside:.1f} mm away)")
        return None, where
    distance, s, match, tol = best
    if distance > tol:
        inst = "" if match.instance_number is None else f", instance {match.instance_number}"
        return None, (f"nearest axial slice plane is {distance:.1f} mm away (stack {s}{inst}), "
                      f"beyond the {tol:.1f} mm tolerance")
    return match, None


def locate_points(points: np.ndarray, stacks: Sequence[StackGeometry], **kwargs: float
                  ) -> list[tuple[SliceMatch | None, str | None]]:
    """:func:`locate_point` for each row of ``points`` (m, 3); NaN rows give a reason."""
    return [locate_point(p, stacks, **kwargs) for p in np.asarray(points, dtype=np.float64)]
