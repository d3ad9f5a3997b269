"""Facts about the RSNA 2024 Lumbar Spine task, each named exactly once.

Every other module imports these names; none repeats the literals.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- Series ---------------------------------------------------------------------------------
SAGITTAL_T1 = "Sagittal T1"
SAGITTAL_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
SERIES_DESCRIPTIONS: tuple[str, ...] = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)
SAGITTAL, AXIAL = "sagittal", "axial"
# Imaging plane of each series type.
SERIES_PLANE: dict[str, str] = {SAGITTAL_T1: SAGITTAL, SAGITTAL_T2: SAGITTAL, AXIAL_T2: AXIAL}


def is_sagittal(series_description: str) -> bool:
    """Whether a series type (one of ``SERIES_DESCRIPTIONS``) is imaged sagittally."""
    return SERIES_PLANE.get(series_description) == SAGITTAL


# --- Conditions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """Every fact about one graded condition.

    Attributes:
        name: column-name form, as in train.csv and submission row ids.
        title: title-case form, as in train_label_coordinates.csv.
        abbrev: short label for figures.
        series: the series type (``SERIES_DESCRIPTIONS``) that carries its labels.
        group: the part of the competition metric that scores it.
        balance: real class balance (Normal/Mild, Moderate, Severe), from FACTS.md; the
            synthetic generator's default and the predictor's fallback prior.
    """

    name: str
    title: str
    abbrev: str
    series: str
    group: str
    balance: tuple[float, float, float]


# In train.csv column order; the metric groups appear in report order.
CONDITION_TABLE: tuple[Condition, ...] = (
    Condition("spinal_canal_stenosis", "Spinal Canal Stenosis", "SCS",
              SAGITTAL_T2, "spinal", (0.878, 0.075, 0.048)),
    Condition("left_neural_foraminal_narrowing", "Left Neural Foraminal Narrowing", "L-NFN",
              SAGITTAL_T1, "foraminal", (0.778, 0.182, 0.040)),
    Condition("right_neural_foraminal_narrowing", "Right Neural Foraminal Narrowing", "R-NFN",
              SAGITTAL_T1, "foraminal", (0.781, 0.180, 0.039)),
    Condition("left_subarticular_stenosis", "Left Subarticular Stenosis", "L-SS",
              AXIAL_T2, "subarticular", (0.714, 0.191, 0.095)),
    Condition("right_subarticular_stenosis", "Right Subarticular Stenosis", "R-SS",
              AXIAL_T2, "subarticular", (0.714, 0.190, 0.096)),
)
# Views of the table, for callers that need one fact of every condition.
CONDITIONS: tuple[str, ...] = tuple(c.name for c in CONDITION_TABLE)
CONDITION_TITLES: dict[str, str] = {c.name: c.title for c in CONDITION_TABLE}
TITLE_TO_CONDITION: dict[str, str] = {v: k for k, v in CONDITION_TITLES.items()}
CONDITION_ABBREVIATIONS: dict[str, str] = {c.name: c.abbrev for c in CONDITION_TABLE}
# Which series type carries each condition's labels.
CONDITION_SERIES: dict[str, str] = {c.name: c.series for c in CONDITION_TABLE}
# Groups scored separately by the competition metric, then averaged with any_severe_spinal.
CONDITION_GROUPS: dict[str, tuple[str, ...]] = {
    g: tuple(c.name for c in CONDITION_TABLE if c.group == g)
    for g in dict.fromkeys(c.group for c in CONDITION_TABLE)
}
CLASS_BALANCE: dict[str, tuple[float, float, float]] = {c.name: c.balance for c in CONDITION_TABLE}

# --- Levels ------------------------------------------------------------------------------
LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
LEVEL_TITLES: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
LEVEL_TITLE_TO_INDEX: dict[str, int] = {t: i for i, t in enumerate(LEVEL_TITLES)}
NUM_LEVELS = len(LEVELS)

# --- Severities ----------------------------------------------------------------------------
# Label text, as in train.csv cells.
SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
SEVERITY_TO_INDEX: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}
# Identifier form (normal_mild, moderate, severe): the submission's probability columns, and
# the keys of plots, tables and log lines.
CLASS_NAMES: tuple[str, ...] = tuple(s.lower().replace("/", "_") for s in SEVERITIES)
NUM_CLASSES = len(SEVERITIES)
# A run's probability columns (oof.csv, eval/predictions.csv: engine/run_folder.py writes them).
CLASS_PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{c}" for c in CLASS_NAMES)
# Competition sample weights by true severity; also the loss's class weights.
CLASS_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)
# v8 head bias at initialisation (softmax -> approx. the spinal class balance).
PRIOR_LOGITS: tuple[float, ...] = (2.0, -2.5, -3.0)
# v6 CORAL head bias at initialisation: logits of P(Y>0), P(Y>1).
CORAL_PRIOR_LOGITS: tuple[float, ...] = (-2.0, -2.95)

# Fallback priors (predict, for levels that cannot be graded): add-one (Dirichlet(1)) smoothing
# of the training counts, then the class reweighting, then a floor: every class keeps at least
# PRIOR_FLOOR (mixed with the uniform distribution), so one wrong fallback row costs at most
# -log(PRIOR_FLOOR) = 6.9 nats times its weight instead of the ~34 of a clipped exact zero.
PRIOR_PSEUDO_COUNT = 1.0
PRIOR_FLOOR = 1e-3

# --- Submission and metric ------------------------------------------------------------------
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id", *CLASS_NAMES)
SOLUTION_WEIGHT_COLUMN = "sample_weight"
ANY_SEVERE_SPINAL = "any_severe_spinal"

# --- Real class balance (FACTS.md), per level ------------------------------------------------
# Spinal canal stenosis counts per level (Normal/Mild, Moderate, Severe) on the real data.
SPINAL_LEVEL_COUNTS: dict[str, tuple[int, int, int]] = {
    "l1_l2": (1886, 67, 21),
    "l2_l3": (1770, 151, 53),
    "l3_l4": (1622, 230, 122),
    "l4_l5": (1482, 237, 255),
    "l5_s1": (1904, 51, 19),
}


def train_column(condition: str, level: str) -> str:
    """Name of the train.csv column for one condition at one level."""
    return f"{condition}_{level}"


def row_id(study_id: int | str, condition: str, level: str) -> str:
    """Submission row id, e.g. ``44036939_spinal_canal_stenosis_l3_l4``."""
    return f"{study_id}_{condition}_{level}"


TRAIN_COLUMNS: tuple[str, ...] = ("study_id",) + tuple(
    train_column(c, lv) for c in CONDITIONS for lv in LEVELS
)
COORD_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "condition", "level", "x", "y",
)
SERIES_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")

# --- Dataset layout (file and folder names of the RSNA 2024 export) -------------------------
TRAIN_CSV = "train.csv"
COORDINATES_CSV = "train_label_coordinates.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
SPLITS: tuple[str, ...] = ("train", "test")


def series_descriptions_csv(split: str) -> str:
    """``train_series_descriptions.csv`` or ``test_series_descriptions.csv``."""
    return f"{split}_series_descriptions.csv"


def images_dir_name(split: str) -> str:
    """``train_images`` or ``test_images``: ``<study>/<series>/<instance>.dcm`` below it."""
    return f"{split}_images"
