"""Is this a lumbar spine? Header evidence and the anatomy of the located discs. numpy only.

Three independent rules, each returning ``None`` (no objection) or a reason for problems.csv:

* :func:`lumbar_header_problem`: BodyPartExamined and the descriptions name other anatomy.
  Conservative: only clear evidence refuses (a knee, a head, a shoulder); missing, empty or
  unfamiliar values pass, and any lumbar evidence in any field wins, since the anatomy rules
  below still judge the images.
* :func:`disc_chain_problem`: the five located discs form one lumbar spine (head-to-feet
  order, lumbar spacings, no sharp kinks, enough localizer confidence).
* :func:`cross_series_problem`: two sagittal series of a study put each disc in the same place.

Points are patient coordinates (mm, LPS: +x left, +y posterior, +z head), one row per level
``L1/L2 .. L5/S1`` (``constants.LEVEL_TITLES``), NaN rows for levels not located.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from spinegrade.constants import LEVEL_TITLES, SAGITTAL_T1, SAGITTAL_T2

# --- Header rule ---------------------------------------------------------------------------

# BodyPartExamined values (upper case, letters and digits only) that include the lumbar
# spine: DICOM defined terms (LSPINE, LSSPINE, TLSPINE, SSPINE) and spellings seen in exports
# ("L SPINE", "L-SPINE", "LUMBAR", German "LWS" Lendenwirbelsaeule). Lumbar evidence.
LUMBAR_BODY_PARTS = frozenset({
    "LSPINE", "LUMBAR", "LUMBARSPINE", "LUMBOSACRAL", "LUMBOSACRALSPINE", "LSSPINE", "LS",
    "TLSPINE", "THORACOLUMBAR", "SSPINE", "SACRUM", "SACRALSPINE", "COCCYX", "WHOLESPINE",
    "ENTIRESPINE", "TOTALSPINE", "CTLSPINE", "LWS",
})
# Spine values that do not say which part: never refused, but no lumbar evidence either (a
# description may still say "cervical"). A thoracic spine is kept: lumbar exams are
# sometimes tagged with the neighbouring region ("BWS": German thoracic, "WS": whole spine).
SPINE_BODY_PARTS = frozenset({"SPINE", "TSPINE", "THORACICSPINE", "BWS", "WS"})
# Fragments that make any field lumbar evidence (after upper-casing and dropping separators).
LUMBAR_FRAGMENTS: tuple[str, ...] = ("LUMB", "LSPINE", "LSSPINE", "TLSPINE", "LWS")
# Level names in free text, e.g. "AX T2 L3-S1", "L4/5".
LUMBAR_LEVEL_PATTERN = re.compile(r"(?<![A-Z])L[1-5](?:\s*[-/]?\s*(?:L?[1-5]|S1))?(?![0-9])")
# Anatomy that is clearly not a lumbar spine, as words of BodyPartExamined or a description.
OTHER_ANATOMY = frozenset({
    "HEAD", "BRAIN", "SKULL", "ORBIT", "ORBITS", "FACE", "SINUS", "SINUSES", "PITUITARY",
    "SELLA", "IAC", "TMJ", "NECK", "CERVICAL", "CSPINE", "CTSPINE", "HWS", "KNEE", "KNEES",
    "SHOULDER", "ELBOW", "WRIST", "HAND", "FINGER", "THUMB", "HIP", "HIPS", "THIGH", "ANKLE",
    "FOOT", "FEET", "TOE", "EXTREMITY", "FOREARM", "HUMERUS", "FEMUR", "TIBIA", "CHEST",
    "THORAX", "BREAST", "BREASTS", "HEART", "CARDIAC", "LUNG", "LUNGS", "ABDOMEN", "LIVER",
    "KIDNEY", "KIDNEYS", "RENAL", "PANCREAS", "PROSTATE", "UTERUS", "OVARY", "TESTIS",
})
# Compact (separator-free) spellings of cervical spine inside longer words ("C-SPINE").
CERVICAL_FRAGMENTS: tuple[str, ...] = ("CSPINE", "CTSPINE", "CERVICAL")


def _compact(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Z]+", text.upper()))


def _is_lumbar_evidence(text: str) -> bool:
    compact = _compact(text)
    if compact in LUMBAR_BODY_PARTS or any(f in compact for f in LUMBAR_FRAGMENTS):
        return True
    return bool(LUMBAR_LEVEL_PATTERN.search(text.upper()))


def _other_anatomy(text: str) -> str | None:
    """The first clear non-lumbar anatomy word in ``text``, or None."""
    found = sorted(_words(text) & OTHER_ANATOMY)
    if found:
        return found[0]
    compact = _compact(text)
    return next((f for f in CERVICAL_FRAGMENTS if f in compact), None)


def lumbar_header_problem(description: str, body_part: str | None, *,
                          study_description: str | None = None,
                          protocol_name: str | None = None) -> str | None:
    """Why a series cannot be a lumbar spine according to its header; None if it can.

    Args:
        description: SeriesDescription ("" when absent).
        body_part: BodyPartExamined (None or "" when absent).
        study_description: StudyDescription, when the caller has it.
        protocol_name: ProtocolName, when the caller has it.

    Returns:
        A reason naming the field and its value, or None. Lumbar evidence in any field
        (a lumbar body part, "lumbar", "L-spine", a level such as "L4-5") always passes.
    """
    fields = [("BodyPartExamined", body_part), ("SeriesDescription", description),
              ("StudyDescription", study_description), ("ProtocolName", protocol_name)]
    present = [(name, str(v)) for name, v in fields if v is not None and str(v).strip()]
    if any(_is_lumbar_evidence(v) for _, v in present):
        return None
    for name, value in present:
        if name == "BodyPartExamined" and _compact(value) in SPINE_BODY_PARTS:
            continue
        word = _other_anatomy(value)
        if word is not None:
            return (f"{name} '{value.strip()}' names {word.lower()} anatomy, not a lumbar "
                    "spine")
    return None


# --- Disc chain rule -----------------------------------------------------------------------

# Adult lumbar disc-to-disc distance (centre to centre) is one vertebral body (about 24-30 mm
# from L1 to L5) plus one disc (7-12 mm), so about 30-42 mm, 25 mm in small adults or with
# collapsed discs, 45 mm in tall ones. The bounds add about 40% on either side for scale and
# localizer error, and still refuse two points on one disc (< 15 mm) and a skipped level
# (two spacings, ~70 mm).
MIN_DISC_SPACING_MM = 15.0
MAX_DISC_SPACING_MM = 60.0
# Lordosis bends the chain of disc centres by about 5-20 degrees per level (most at
# L4/L5-L5/S1); 45 degrees between consecutive segments is no spine.
MAX_KINK_DEG = 45.0
# A segment must run mostly head to feet: lordosis and scoliosis tilt a segment by up to
# about 40 degrees from the S-I axis.
MAX_AXIS_ANGLE_DEG = 60.0
# Fewer confident discs than this cannot show a spine.
MIN_LOCATED = 3


def _angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _located(points: np.ndarray, confidences: np.ndarray, min_conf: float
             ) -> tuple[np.ndarray, str | None]:
    """Indices of levels with a finite point and confidence >= min_conf; a reason if too few."""
    finite = np.all(np.isfinite(points), axis=1)
    confident = np.isfinite(confidences) & (confidences >= min_conf)
    keep = np.flatnonzero(finite & confident)
    if len(keep) >= min(MIN_LOCATED, len(points)):
        return keep, None
    weak = [LEVEL_TITLES[i] for i in np.flatnonzero(finite & ~confident)]
    detail = f"; below confidence {min_conf:g}: {', '.join(weak)}" if weak else ""
    return keep, (f"only {len(keep)} of {len(points)} discs located with enough confidence "
                  f"(need {MIN_LOCATED}){detail}")


def _segment_problem(a: str, b: str, seg: np.ndarray, levels: int) -> str | None:
    """Order, axis angle and spacing of the segment from level a to level b."""
    if seg[2] >= 0:
        return f"{b} is not below {a} (discs not in head-to-feet order)"
    off_axis = _angle_deg(seg, np.array([0.0, 0.0, -1.0]))
    if off_axis > MAX_AXIS_ANGLE_DEG:
        return (f"{a} to {b} runs {off_axis:.0f} deg off the head-to-feet axis "
                f"(at most {MAX_AXIS_ANGLE_DEG:.0f})")
    spacing = float(np.linalg.norm(seg)) / levels
    if not MIN_DISC_SPACING_MM <= spacing <= MAX_DISC_SPACING_MM:
        return (f"{a} to {b}: {spacing:.1f} mm per level, outside the lumbar range "
                f"{MIN_DISC_SPACING_MM:.0f}-{MAX_DISC_SPACING_MM:.0f} mm")
    return None


def disc_chain_problem(points_mm: np.ndarray, confidences: np.ndarray, min_conf: float
                       ) -> str | None:
    """Why the located discs are not one lumbar spine; None when they are plausible.

    Levels without a point (NaN row) or with confidence below ``min_conf`` are left out;
    the others, in order L1/L2 .. L5/S1, must run head to feet (LPS z decreasing, each
    segment within ``MAX_AXIS_ANGLE_DEG`` of the S-I axis), be ``MIN_DISC_SPACING_MM`` ..
    ``MAX_DISC_SPACING_MM`` apart per level (a skipped level counts twice) and bend by at
    most ``MAX_KINK_DEG`` between consecutive segments.

    Args:
        points_mm: (5, 3) disc positions, mm, LPS.
        confidences: (5,) localizer confidence per level (NaN: not located).
        min_conf: confidence a level needs to count as located.
    """
    pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    if len(conf) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(conf)} confidences")
    keep, problem = _located(pts, conf, min_conf)
    if problem:
        return problem
    segments = []
    for i, j in zip(keep[:-1], keep[1:], strict=True):
        seg = pts[j] - pts[i]
        problem = _segment_problem(LEVEL_TITLES[i], LEVEL_TITLES[j], seg, int(j - i))
        if problem:
            return problem
        segments.append((LEVEL_TITLES[j], seg))
    for (at, u), (_, v) in zip(segments[:-1], segments[1:], strict=True):
        kink = _angle_deg(u, v)
        if kink > MAX_KINK_DEG:
            return (f"the disc chain bends {kink:.0f} deg at {at} (at most "
                    f"{MAX_KINK_DEG:.0f}): not one spine")
    return None


# --- Cross-series rule ---------------------------------------------------------------------


def cross_series_problem(points_a: np.ndarray, points_b: np.ndarray, tol_mm: float, *,
                         names: Sequence[str] = (SAGITTAL_T2, SAGITTAL_T1),
                         ignore_lateral: bool = False) -> str | None:
    """Why two series' disc positions disagree; None when every shared level is within tol.

    Args:
        points_a, points_b: (5, 3) disc positions of the same study from two series (mm, LPS;
            NaN rows for levels not located). Levels located in only one are not compared.
        tol_mm: largest allowed 3D distance between the two positions of one disc (a
            neighbouring disc is about 35 mm away, so well under half of that).
        names: the two series, for the message.
        ignore_lateral: compare only A-P and S-I (e.g. when one series' points are foramina,
            left or right of the midline).
    """
    a = np.asarray(points_a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(points_b, dtype=np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"point arrays differ in shape: {a.shape} and {b.shape}")
    diff = a - b
    if ignore_lateral:
        diff[:, 0] = 0.0
    dist = np.linalg.norm(diff, axis=1)
    bad = [i for i in np.flatnonzero(np.isfinite(dist)) if dist[i] > tol_mm]
    if not bad:
        return None
    listed = ", ".join(f"{LEVEL_TITLES[i]} {dist[i]:.1f} mm" for i in bad)
    return (f"{names[0]} and {names[1]} place the discs apart by more than {tol_mm:g} mm: "
            f"{listed}")
