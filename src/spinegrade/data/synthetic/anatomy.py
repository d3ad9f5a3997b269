"""A per-study analytic lumbar spine phantom in LPS patient coordinates.

The spine axis is a smooth curve in the mid-sagittal plane (lordosis as a parabola in z, a
little extra bend at the sacrum, a slight coronal tilt). Every point is described by local
coordinates relative to that curve and the nearest disc plane:

- ``a``: lateral offset in mm, positive towards the patient's left (+x);
- ``u``: antero-posterior offset from the posterior wall of the vertebral bodies, positive
  posterior;
- ``h``: signed distance from the nearest disc mid-plane along the spine axis, positive
  superior;
- ``idx``: which disc is nearest.

Tissue classes are painted from these coordinates; the severity of each condition is a
continuous narrowing of the real structure at that disc (the thecal sac for spinal canal
stenosis, the fat-filled foramen for foraminal narrowing, the lateral recess for subarticular
stenosis), never a planted marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinegrade.constants import CONDITIONS, NUM_LEVELS

# Discs from superior to inferior: two thoracolumbar discs, the five labelled lumbar discs,
# then two fused sacral segments (a thin bony line instead of a disc).
DISC_NAMES: tuple[str, ...] = (
    "t11_t12", "t12_l1", "l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1", "s1_s2", "s2_s3",
)
FIRST_LABELLED_DISC = 2
FIRST_FUSED_DISC = FIRST_LABELLED_DISC + NUM_LEVELS

# Tissue classes; intensities per sequence live in render.py.
AIR, FAT, MUSCLE, VISCERA, VESSEL, MARROW, CORTEX, ANNULUS, NUCLEUS = range(9)
CSF, EPIDURAL_FAT, LIGAMENT, NERVE, POSTERIOR_BONE = range(9, 14)
N_TISSUES = 14

LORDOSIS_REACH = 80.0  # mm from L3 over which the lumbar curve bends

SPINAL, LEFT_FORAMEN, RIGHT_FORAMEN, LEFT_RECESS, RIGHT_RECESS = range(len(CONDITIONS))


@dataclass(frozen=True)
class Anatomy:
    """One study's spine: shape parameters plus the latent narrowing of every structure.

    Lengths are in mm. ``narrowing`` has shape ``(len(CONDITIONS), len(DISC_NAMES))`` with
    values in [0, 1]; only the labelled discs carry non-zero values.
    """

    x0: float
    y0: float
    z_mid: float
    lordosis: float
    sacral_bend: float
    coronal_tilt: float
    disc_z: np.ndarray
    disc_half: np.ndarray
    body_ap: float
    body_lat: float
    sac_ap: float
    sac_lat: float
    gap_front: float
    gap_back: float
    lf_thickness: float
    bulge: float
    front_share: np.ndarray
    narrowing: np.ndarray
    skin_lat: float
    skin_ap: float

    @property
    def sac_centre(self) -> float:
        """``u`` of the thecal sac's centre when not narrowed."""
        return self.gap_front + self.sac_ap

    @property
    def canal_back(self) -> float:
        """``u`` of the posterior bony canal wall (lamina / ligamentum flavum)."""
        return self.gap_front + 2 * self.sac_ap + self.gap_back

    @property
    def canal_lat(self) -> float:
        """Half-width of the bony canal (up to the pedicles)."""
        return self.sac_lat + 3.0

    @property
    def foramen_a(self) -> float:
        """Lateral offset of the neural foramina (centre of the pedicle gap)."""
        return self.canal_lat + 4.5

    @property
    def foramen_uh(self) -> tuple[float, float]:
        """(u, h) of a foramen's centre."""
        return 0.42 * self.canal_back + 0.5, 1.0

    @property
    def recess_au(self) -> tuple[float, float]:
        """(|a|, u) of a lateral (subarticular) recess on the disc plane."""
        return 0.9 * self.sac_lat, self.gap_front + 2.2


def sample_anatomy(rng: np.random.Generator, latent: np.ndarray) -> Anatomy:
    """Draw a random spine whose labelled discs carry the given latent narrowing.

    Args:
        rng: the study's random generator.
        latent: ``(len(CONDITIONS), NUM_LEVELS)`` narrowing in [0, 1] per condition and level.
    """
    n = len(DISC_NAMES)

    def draw(lo: float, hi: float) -> float:
        # Python floats keep the float32 pixel arithmetic in float32 (NumPy 2 promotion).
        return float(rng.uniform(lo, hi))

    scale = draw(0.9, 1.1)
    spacing = 39.0 * scale * rng.uniform(0.96, 1.04, n - 1)
    z_top = draw(-20, 20) + spacing.sum() * 0.55
    disc_z = z_top - np.concatenate([[0.0], np.cumsum(spacing)])
    disc_half = 4.6 * scale * rng.uniform(0.88, 1.12, n)
    disc_half[FIRST_FUSED_DISC:] = 0.8
    narrowing = np.zeros((len(CONDITIONS), n), dtype=np.float32)
    narrowing[:, FIRST_LABELLED_DISC:FIRST_FUSED_DISC] = latent
    sac_ap = 7.4 * scale * draw(0.92, 1.08)
    return Anatomy(
        x0=draw(-15, 15), y0=draw(-10, 20),
        z_mid=float(disc_z[FIRST_LABELLED_DISC + 2]) + draw(-10, 10),
        lordosis=draw(0.0012, 0.0022), sacral_bend=draw(0.003, 0.006),
        coronal_tilt=draw(-0.02, 0.02),
        disc_z=disc_z, disc_half=disc_half.astype(np.float32),
        body_ap=16.0 * scale, body_lat=22.0 * scale * draw(0.95, 1.05),
        sac_ap=sac_ap, sac_lat=sac_ap * draw(1.25, 1.45),
        gap_front=draw(1.3, 2.0), gap_back=draw(2.6, 3.4),
        lf_thickness=draw(1.0, 1.6), bulge=draw(0.3, 0.9),
        front_share=rng.uniform(0.4, 0.65, n).astype(np.float32), narrowing=narrowing,
        skin_lat=draw(140, 175), skin_ap=draw(100, 130),
    )


def _axis_y(an: Anatomy, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """y of the spine axis at height z and its slope dy/dz.

    Lordosis is parabolic around L3 and straightens out beyond ``LORDOSIS_REACH`` mm; the
    sacrum bends further back below L5/S1.
    """
    dz = (z - an.z_mid) / LORDOSIS_REACH
    root = np.sqrt(1.0 + dz * dz)
    below = np.minimum(z - float(an.disc_z[FIRST_FUSED_DISC - 1]), 0.0)
    y = an.y0 + 2 * an.lordosis * LORDOSIS_REACH**2 * (root - 1) + an.sacral_bend * below * below
    slope = 2 * an.lordosis * LORDOSIS_REACH * dz / root + 2 * an.sacral_bend * below
    return y, slope


def disc_frame(an: Anatomy, disc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre ``D`` (posterior wall of the disc), axis tangent ``t`` and posterior normal ``n``."""
    z = np.float64(an.disc_z[disc])
    y, s = _axis_y(an, z)
    norm = np.hypot(1.0, s)
    centre = np.array([an.x0 + an.coronal_tilt * (z - an.z_mid), y, z])
    tangent = np.array([0.0, s, 1.0]) / norm
    posterior = np.array([0.0, 1.0, -s]) / norm
    return centre, tangent, posterior


def local_to_patient(an: Anatomy, disc: int, a: float, u: float, h: float) -> np.ndarray:
    """Patient (LPS) position of local coordinates ``(a, u, h)`` relative to ``disc``."""
    centre, tangent, posterior = disc_frame(an, disc)
    return centre + h * tangent + u * posterior + np.array([a, 0.0, 0.0])


def _axis_coords(
    an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lateral ``a`` and antero-posterior ``u`` of patient points relative to the spine axis."""
    ay, slope = _axis_y(an, z)
    u = (y - ay) / np.sqrt(1.0 + slope * slope)
    a = x - (an.x0 + an.coronal_tilt * (z - an.z_mid))
    return a.astype(np.float32), u.astype(np.float32)


def _nearest_disc(an: Anatomy, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance ``h`` to the nearest disc plane and that disc's index."""
    h = np.full(z.shape, np.inf, dtype=np.float32)
    idx = np.zeros(z.shape, dtype=np.intp)
    if z.size == 0:
        return h, idx
    lo, hi = float(z.min()) - 60.0, float(z.max()) + 60.0
    for i in range(len(DISC_NAMES)):
        if not lo <= an.disc_z[i] <= hi:
            continue  # too far from every point to be the nearest disc
        centre, tangent, _ = disc_frame(an, i)
        hi_ = (y - np.float32(centre[1])) * np.float32(tangent[1])
        hi_ += (z - np.float32(centre[2])) * np.float32(tangent[2])
        closer = np.abs(hi_) < np.abs(h)
        h[closer] = hi_[closer]
        idx[closer] = i
    return h, idx


def local_coords(
    an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local ``(a, u, h, idx)`` of patient points (arrays of one shape, float32)."""
    a, u = _axis_coords(an, x, y, z)
    h, idx = _nearest_disc(an, y, z)
    return a, u, h, idx


def _ellipse(a: np.ndarray, u: np.ndarray, ca: float, cu, ra, ru) -> np.ndarray:
    """Inside test of an axis-aligned ellipse in the (a, u) plane (centres/radii may be arrays)."""
    return ((a - ca) / ra) ** 2 + ((u - cu) / ru) ** 2 < 1.0


def _paint_soft_tissue(an: Anatomy, t: np.ndarray, a: np.ndarray, u: np.ndarray) -> None:
    """Body outline, subcutaneous fat, muscles, abdomen and great vessels."""
    cu = 20.0 - an.skin_ap * 0.5
    t[_ellipse(a, u, 0.0, cu, an.skin_lat, an.skin_ap)] = FAT
    t[_ellipse(a, u, 0.0, cu, an.skin_lat - 14, an.skin_ap - 14)] = MUSCLE
    front = -2 * an.body_ap - 6
    t[_ellipse(a, u, 0.0, cu - 30, an.skin_lat - 40, an.skin_ap - 35) & (u < front)] = VISCERA
    for side in (1.0, -1.0):
        t[_ellipse(a, u, side * (an.body_lat + 14), -an.body_ap, 13.0, 17.0)] = MUSCLE
    t[_ellipse(a, u, 14.0, front - 9, 9.0, 9.0)] = VESSEL  # aorta, left of midline
    t[_ellipse(a, u, -18.0, front - 8, 10.0, 8.0)] = VESSEL  # inferior vena cava


def _paint_vertebrae(an: Anatomy, t, a, u, h, idx) -> None:
    """Vertebral bodies with cortex and endplates, discs with nucleus, fused sacral lines."""
    rho = (a / an.body_lat) ** 2 + ((u + an.body_ap) / an.body_ap) ** 2
    inside = rho < 1.0
    half = an.disc_half[idx]
    absh = np.abs(h)
    fused = idx >= FIRST_FUSED_DISC
    t[inside] = MARROW
    t[inside & ((rho > 0.86) | (absh < half + 1.0))] = CORTEX
    disc = inside & (absh < half) & ~fused
    t[disc] = ANNULUS
    t[disc & (rho < 0.45) & (absh < 0.7 * half)] = NUCLEUS


def _sac_profile(an: Anatomy, h: np.ndarray, idx: np.ndarray):
    """Front and back ``u`` of the thecal sac and its half-width, narrowed at each disc."""
    z = an.narrowing[SPINAL][idx]
    g = np.exp(-((h / (an.disc_half[idx] + 2.0)) ** 2))
    loss = 2 * an.sac_ap * z * g
    share = an.front_share[idx]
    front = an.gap_front + share * loss
    back = an.gap_front + 2 * an.sac_ap - (1 - share) * loss
    half_width = an.sac_lat * (1 - 0.3 * z * g)
    return front, back, half_width, share * loss, (1 - share) * loss


def _paint_canal(an: Anatomy, t, a, u, h, idx) -> None:
    """Bony canal, posterior elements, disc bulge, ligamentum flavum and the thecal sac."""
    half = an.disc_half[idx]
    absh, absa = np.abs(h), np.abs(a)
    cb, cl = an.canal_back, an.canal_lat
    near_disc = absh < half + 5.0
    # Posterior elements: pedicles and laminae between discs, facets and spinous processes.
    t[(absa < cl + 8) & (absa > cl - 1) & (u > -1) & (u < cb + 2) & ~near_disc] = POSTERIOR_BONE
    t[(absa < cl + 8) & (u >= cb) & (u < cb + 6) & (absh > half + 3)] = POSTERIOR_BONE
    t[(absa < 3.5) & (u >= cb + 3) & (u < cb + 38) & (absh > half + 7)] = POSTERIOR_BONE
    for side in (1.0, -1.0):
        facet = _ellipse(a, u, side * (cl + 5), cb - 1, 6.5, 8.0) & (absh < half + 9)
        t[facet] = POSTERIOR_BONE
        joint = facet & (np.abs(side * a - (cl + 5) - 0.3 * (u - cb + 1)) < 0.6)
        t[joint] = LIGAMENT
    canal = (absa < cl) & (u >= 0) & (u < cb) & (((u - cb / 2) / (cb / 2)) ** 4 + (a / cl) ** 2 < 1)
    t[canal] = EPIDURAL_FAT
    front, back, width, d_front, d_back = _sac_profile(an, h, idx)
    lateral = np.clip(1 - (a / an.body_lat) ** 4, 0, 1)
    bulge_h = np.clip(1 - (h / (half + 1.5)) ** 2, 0, 1)
    t[(u >= -0.5) & (u < (an.bulge * bulge_h + d_front) * lateral) & (absh < half + 1.5)] = ANNULUS
    lf_front = cb - an.lf_thickness * (absh < half + 6) - d_back
    t[canal & (u > lf_front)] = LIGAMENT
    mid, rad = (front + back) / 2, np.maximum((back - front) / 2, 0.3)
    t[_ellipse(a, u, 0.0, mid, width, rad)] = CSF


def _paint_recesses(an: Anatomy, t, a, u, h, idx) -> None:
    """Traversing nerve roots in the lateral recesses; superior articular process encroaching."""
    ra, ur = an.recess_au
    g = np.exp(-((h / (an.disc_half[idx] + 3.0)) ** 2))
    for side, cond in ((1.0, LEFT_RECESS), (-1.0, RIGHT_RECESS)):
        z = an.narrowing[cond][idx] * g
        t[_ellipse(a, u, side * (ra + 0.6), ur, 1.4, 1.4)] = NERVE
        # Facet (superior articular process) and ligamentum flavum hypertrophy grow in from
        # behind and the side: a dark ligament rim around bone.
        radius = 1.5 + 6.0 * z
        ca, cu = side * (ra + 3.0), ur + 5.0
        soft = (t != CORTEX) & (t != MARROW) & (t != ANNULUS)
        t[_ellipse(a, u, ca, cu, radius, radius) & soft] = LIGAMENT
        core = np.maximum(radius - 1.5, 0.05)
        t[_ellipse(a, u, ca, cu, core, core) & soft] = POSTERIOR_BONE


def _paint_foramina(an: Anatomy, t, a, u, h, idx) -> None:
    """Fat-filled neural foramina between the pedicles, each with its exiting nerve root."""
    half = an.disc_half[idx]
    cl = an.canal_lat
    fu, fh = an.foramen_uh
    for side, cond in ((1.0, LEFT_FORAMEN), (-1.0, RIGHT_FORAMEN)):
        sa = side * a
        z = an.narrowing[cond][idx]
        box = (sa > cl - 0.5) & (sa < cl + 11) & (np.abs(h) < half + 5) & (u > 0.3) & (u < an.canal_back - 3)
        t[box] = LIGAMENT
        ru, rh = 5.5 * (1 - 0.8 * z), (half + 4.5) * (1 - 0.6 * z)
        fat = box & _ellipse(h, u, fh, fu, rh, ru)
        t[fat] = EPIDURAL_FAT
        root_h = fh + 0.45 * rh
        t[box & _ellipse(h, u, root_h, fu, 1.9, np.minimum(1.9, ru))] = NERVE


def tissue_classes(an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Tissue class (uint8) of every patient point; arrays of one shape, LPS mm."""
    shape = x.shape
    x, y, z = x.ravel(), y.ravel(), z.ravel()
    a, u = _axis_coords(an, x, y, z)
    t = np.zeros(x.shape, dtype=np.uint8)
    _paint_soft_tissue(an, t, a, u)
    # Only points near the spine need the detailed (and costlier) bony anatomy.
    near = np.flatnonzero(
        (np.abs(a) < an.canal_lat + 20) & (u > -2 * an.body_ap - 3) & (u < an.canal_back + 41)
    )
    h, idx = _nearest_disc(an, y[near], z[near])
    sub, a, u = t[near], a[near], u[near]
    _paint_vertebrae(an, sub, a, u, h, idx)
    _paint_canal(an, sub, a, u, h, idx)
    _paint_foramina(an, sub, a, u, h, idx)
    _paint_recesses(an, sub, a, u, h, idx)
    t[near] = sub
    return t.reshape(shape)


def label_targets(an: Anatomy, level: int) -> dict[int, np.ndarray]:
    """Where a radiologist would click for each condition at one labelled level (LPS mm)."""
    disc = FIRST_LABELLED_DISC + level
    front, back, *_ = _sac_profile(an, np.zeros(1), np.array([disc]))
    canal_mid = float((front[0] + back[0]) / 2)
    fu, fh = an.foramen_uh
    ra, ur = an.recess_au
    return {
        SPINAL: local_to_patient(an, disc, 0.0, canal_mid, 0.0),
        LEFT_FORAMEN: local_to_patient(an, disc, an.foramen_a, fu, fh),
        RIGHT_FORAMEN: local_to_patient(an, disc, -an.foramen_a, fu, fh),
        LEFT_RECESS: local_to_patient(an, disc, ra, ur, 0.0),
        RIGHT_RECESS: local_to_patient(an, disc, -ra, ur, 0.0),
    }
