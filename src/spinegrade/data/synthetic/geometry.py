"""Slice geometry of the synthetic series: DICOM orientation, positions and pixel grids.

Every number here is rounded the way it is written to the DICOM header before anything is
rendered from it, so the pixels and the header agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spinegrade.constants import NUM_LEVELS
from spinegrade.data.synthetic.anatomy import FIRST_LABELLED_DISC, Anatomy, disc_frame

DECIMALS = 5  # digits kept for positions and direction cosines (fits a DICOM DS)


@dataclass(frozen=True)
class SliceGeom:
    """One image plane: first-pixel centre, direction cosines, spacing and matrix."""

    position: np.ndarray  # ImagePositionPatient (3,)
    row_dir: np.ndarray  # direction of increasing column index (3,)
    col_dir: np.ndarray  # direction of increasing row index (3,)
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    rows: int
    cols: int
    stack: int = 0  # which parallel stack of the series it belongs to

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, row direction x column direction."""
        return np.cross(self.row_dir, self.col_dir)

    def to_pixel(self, point: np.ndarray) -> tuple[float, float]:
        """(x = column, y = row) of the projection of a patient point onto this plane."""
        d = point - self.position
        return float(d @ self.row_dir / self.spacing[1]), float(d @ self.col_dir / self.spacing[0])

    def distance(self, point: np.ndarray) -> float:
        """Unsigned distance from a patient point to this plane."""
        return abs(float((point - self.position) @ self.normal))

    def grid(self, factor: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient x, y, z (float32) of the pixel centres, on a grid ``factor`` times coarser.

        A coarse pixel covers ``factor`` x ``factor`` native pixels and sits at their centre,
        matching ``cv2.resize(..., INTER_LINEAR)`` when it is brought back to full size.
        """
        r = (np.arange(-(-self.rows // factor)) * factor + (factor - 1) / 2) * self.spacing[0]
        c = (np.arange(-(-self.cols // factor)) * factor + (factor - 1) / 2) * self.spacing[1]
        rr, cc = np.meshgrid(r.astype(np.float32), c.astype(np.float32), indexing="ij")
        return tuple(  # type: ignore[return-value]
            np.float32(self.position[k]) + cc * np.float32(self.row_dir[k])
            + rr * np.float32(self.col_dir[k])
            for k in range(3)
        )


@dataclass
class SeriesGeom:
    """A series: its slices in spatial order within each stack, and the instance numbers."""

    description: str
    slices: list[SliceGeom]
    thickness: float
    spacing_between: float
    instance_numbers: list[int] = field(default_factory=list)
    order: str = "ascending"  # ascending | descending | shuffled, instance vs spatial order

    def nearest(self, point: np.ndarray, stack: int | None = None) -> int:
        """Index (into ``slices``) of the slice whose plane is nearest to ``point``."""
        cands = [i for i, s in enumerate(self.slices) if stack is None or s.stack == stack]
        return min(cands, key=lambda i: self.slices[i].distance(point))


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A small random rotation (about x, then y, then z) of at most ``max_deg`` per axis."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _orthonormal(row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rounded, re-orthogonalised direction cosines."""
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return np.round(row, DECIMALS), np.round(col, DECIMALS)


def _matrix(rng: np.random.Generator, choices: list[tuple[int, int]], cap: int | None):
    rows, cols = choices[rng.integers(len(choices))]
    if cap:
        f = min(1.0, cap / max(rows, cols))
        rows, cols = max(16, int(rows * f) // 2 * 2), max(16, int(cols * f) // 2 * 2)
    return rows, cols


def _stack(
    centre: np.ndarray, row: np.ndarray, col: np.ndarray, offsets: np.ndarray,
    fov: float, rows: int, cols: int, stack: int = 0,
) -> list[SliceGeom]:
    """Parallel slices whose image centres lie at ``centre + offset * normal``."""
    row, col = _orthonormal(row, col)
    normal = np.cross(row, col)
    spacing = round(fov / max(rows, cols), DECIMALS)
    out = []
    for off in offsets:
        mid = centre + off * normal
        pos = mid - row * spacing * (cols - 1) / 2 - col * spacing * (rows - 1) / 2
        out.append(SliceGeom(np.round(pos, DECIMALS), row, col, (spacing, spacing), rows, cols, stack))
    return out


SAGITTAL_MATRICES = [(256, 256), (320, 320), (384, 384), (448, 448), (512, 512), (640, 640),
                     (384, 320), (512, 448)]
AXIAL_MATRICES = [(256, 256), (320, 320), (384, 384), (448, 448), (320, 256), (512, 512)]


def sagittal_series(
    rng: np.random.Generator, an: Anatomy, description: str, max_matrix: int | None
) -> SeriesGeom:
    """A sagittal stack centred on the mid-sagittal plane, covering both foramina."""
    thick = round(rng.uniform(3.0, 4.5), 1)
    step = round(thick + rng.uniform(0.0, 0.8), 2)
    n = int(rng.integers(15, 20))
    rows, cols = _matrix(rng, SAGITTAL_MATRICES, max_matrix)
    fov = rng.uniform(250, 320)
    rot = _rotation(rng, 2.0)
    mid_disc, _, _ = disc_frame(an, FIRST_LABELLED_DISC + 2)
    centre = mid_disc + np.array([0.0, rng.uniform(10, 40), rng.uniform(-20, 20)])
    # One slice lies within a fifth of a step of the midline, so the mid-sagittal slice is
    # unambiguous; the rest spread evenly on both sides (one more on a random side if even).
    first = -(n // 2) if rng.random() < 0.5 else -((n - 1) // 2)
    offsets = (np.arange(n) + first + rng.uniform(-0.2, 0.2)) * step
    # Sagittal: rows run posterior (+y), columns run inferior (-z): the usual display.
    slices = _stack(centre, rot @ [0, 1.0, 0], rot @ [0, 0, -1.0], offsets, fov, rows, cols)
    # The stack is offset along its normal from the midline only by the chosen sub-step.
    shift = (mid_disc - centre) @ slices[0].normal
    slices = [
        SliceGeom(np.round(s.position + shift * s.normal, DECIMALS), s.row_dir, s.col_dir,
                  s.spacing, s.rows, s.cols, s.stack)
        for s in slices
    ]
    return SeriesGeom(description, slices, thick, step)


def axial_series(
    rng: np.random.Generator, an: Anatomy, description: str, max_matrix: int | None,
    per_level: bool,
) -> SeriesGeom:
    """Axial T2: short stacks tilted along each disc, or one stack covering L1-S1."""
    thick = round(rng.uniform(3.5, 4.5), 1)
    step = round(thick + rng.uniform(0.0, 0.6), 2)
    rows, cols = _matrix(rng, AXIAL_MATRICES, max_matrix)
    fov = rng.uniform(170, 220)
    slices: list[SliceGeom] = []
    if per_level:
        for level in range(NUM_LEVELS):
            centre, tangent, _ = disc_frame(an, FIRST_LABELLED_DISC + level)
            rot = _rotation(rng, 1.5)
            normal = rot @ tangent
            row = rot @ np.array([1.0, 0.0, 0.0])
            col = np.cross(normal, row)
            n = int(rng.integers(3, 6))
            offsets = (np.arange(n) - (n - 1) // 2 + rng.uniform(-0.2, 0.2)) * step
            img_centre = centre + np.array([0.0, rng.uniform(5, 25), 0.0])
            img_centre = img_centre - ((img_centre - centre) @ normal) * normal
            slices += _stack(img_centre, row, col, offsets, fov, rows, cols, stack=level)
        return SeriesGeom(description, slices, thick, step)
    top, _, _ = disc_frame(an, FIRST_LABELLED_DISC)
    bottom, _, _ = disc_frame(an, FIRST_LABELLED_DISC + NUM_LEVELS - 1)
    rot = _rotation(rng, 1.5)
    normal, row = rot @ [0, 0, 1.0], rot @ [1.0, 0, 0]
    span = (top[2] - bottom[2]) + 30.0
    n = int(span // step) + 1
    mid = (top + bottom) / 2 + np.array([0.0, rng.uniform(5, 25), 0.0])
    offsets = (np.arange(n) - (n - 1) / 2) * step
    slices = _stack(mid, row, np.cross(normal, row), offsets, fov, rows, cols)
    return SeriesGeom(description, slices, thick, step)


def number_instances(rng: np.random.Generator, series: SeriesGeom, p_odd: float) -> None:
    """Assign 1-based instance numbers, sometimes reversed, shuffled or skipping numbers."""
    n = len(series.slices)
    # Axial stacks are acquired top to bottom; sagittal ones right to left or left to right.
    order = "ascending"
    r = rng.random()
    if r < p_odd:
        order = "shuffled"
    elif r < 3 * p_odd:
        order = "descending"
    steps = np.where(rng.random(n) < p_odd / 2, 2, 1)
    start = int(rng.integers(1, 4)) if rng.random() < p_odd else 0
    numbers = start + np.cumsum(steps)
    if order == "descending":
        numbers = numbers[::-1]
    elif order == "shuffled":
        numbers = rng.permutation(numbers)
    series.instance_numbers = [int(v) for v in numbers]
    series.order = order
