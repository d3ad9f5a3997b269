"""Slice geometry from DICOM patient coordinates (LPS, millimetres). Pure numpy.

DICOM places every slice with ImagePositionPatient (IPP, the centre of the first pixel) and
ImageOrientationPatient (IOP, the row and column direction cosines). The slice normal is
``row x column``; a slice's position along the stack is ``IPP . normal``. Sorting by that
projection is the only reliable spatial order: InstanceNumber is not (FACTS.md).
"""

from __future__ import annotations

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
