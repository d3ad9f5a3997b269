"""Render MR-like slices of the phantom: contrast per sequence, blur, bias field, Rician noise."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from spinegrade.data.synthetic import anatomy as A
from spinegrade.data.synthetic.geometry import SliceGeom

# Relative signal of each tissue class, indexed by the class numbers in anatomy.py.
_T1 = {A.AIR: 0.0, A.FAT: 0.95, A.MUSCLE: 0.3, A.VISCERA: 0.45, A.VESSEL: 0.05,
       A.MARROW: 0.62, A.CORTEX: 0.08, A.ANNULUS: 0.42, A.NUCLEUS: 0.36, A.CSF: 0.12,
       A.EPIDURAL_FAT: 0.9, A.LIGAMENT: 0.12, A.NERVE: 0.3, A.POSTERIOR_BONE: 0.55}
_T2 = {A.AIR: 0.0, A.FAT: 0.78, A.MUSCLE: 0.18, A.VISCERA: 0.5, A.VESSEL: 0.05,
       A.MARROW: 0.42, A.CORTEX: 0.06, A.ANNULUS: 0.32, A.NUCLEUS: 0.85, A.CSF: 1.0,
       A.EPIDURAL_FAT: 0.6, A.LIGAMENT: 0.1, A.NERVE: 0.32, A.POSTERIOR_BONE: 0.38}
# STIR nulls fat: fat-containing tissues go dark, fluid stays bright.
_STIR = {**_T2, A.FAT: 0.08, A.EPIDURAL_FAT: 0.12, A.MARROW: 0.18, A.POSTERIOR_BONE: 0.15}
CONTRASTS = {"t1": _T1, "t2": _T2, "stir": _STIR}

# Largest rendered matrix side; larger images are rendered coarser and interpolated up,
# as scanners do when they zero-fill the acquisition matrix.
MAX_RENDER = 384


@dataclass(frozen=True)
class Appearance:
    """How one series looks: contrast, scale, noise, bias field and stored-value encoding."""

    contrast: str
    table: np.ndarray  # (N_TISSUES,) float32 relative signal
    scale: float  # signal of a relative intensity of 1
    noise: float  # noise sigma relative to ``scale``
    bias: tuple[float, float, float]  # linear bias field along rows, columns; radial term
    blur_mm: float
    max_value: int  # largest stored value (4095 for 12-bit, else 65535)


def sample_appearance(rng: np.random.Generator, contrast: str) -> Appearance:
    """Random scanner appearance for one series of the given contrast (t1 | t2 | stir)."""
    base = CONTRASTS[contrast]
    table = np.array([base[i] for i in range(A.N_TISSUES)], dtype=np.float32)
    table *= rng.uniform(0.93, 1.07, A.N_TISSUES).astype(np.float32)
    twelve_bit = rng.random() < 0.6
    def draw(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))  # Python floats keep pixel maths in float32

    return Appearance(
        contrast=contrast, table=table,
        scale=draw(600, 2400) if twelve_bit else draw(800, 12000), noise=draw(0.012, 0.035),
        bias=(draw(-0.25, 0.25), draw(-0.25, 0.25), draw(0.0, 0.3)),
        blur_mm=draw(0.4, 0.8), max_value=4095 if twelve_bit else 65535,
    )


def render_slice(
    an: A.Anatomy, geom: SliceGeom, look: Appearance, rng: np.random.Generator
) -> np.ndarray:
    """Signal (float32, same units as ``look.scale``) of one slice on its DICOM pixel grid."""
    factor = max(1, -(-max(geom.rows, geom.cols) // MAX_RENDER))
    x, y, z = geom.grid(factor)
    img = look.table[A.tissue_classes(an, x, y, z)]
    sigma = look.blur_mm / (geom.spacing[0] * factor)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(sigma, 0.3))
    if factor > 1:
        img = cv2.resize(img, (geom.cols, geom.rows), interpolation=cv2.INTER_LINEAR)
    rr = np.linspace(-1, 1, geom.rows, dtype=np.float32)[:, None]
    cc = np.linspace(-1, 1, geom.cols, dtype=np.float32)[None, :]
    b_r, b_c, b_rad = look.bias
    field = 1.0 + b_r * rr + b_c * cc - b_rad * (rr * rr + cc * cc) / 2
    img = img * field * np.float32(look.scale)
    sd = np.float32(look.noise * look.scale)
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * sd
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * sd
    # Magnitude images: noise on the real and imaginary channels gives Rician statistics.
    return np.sqrt((img + n1) ** 2 + n2 * n2)
