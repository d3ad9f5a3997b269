"""Facts about the RSNA 2024 Lumbar Spine task, each named exactly once.

Every other module imports these names; none repeats the literals.
"""

from __future__ import annotations

# --- Conditions ------------------------------------------------------------------------------
# Column-name form, as in train.csv and submission row ids.
CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
# Title-case form, as in train_label_coordinates.csv.
CONDITION_TITLES: dict[str, str] = {
    "spinal_canal_stenosis": "Spinal Canal Stenosis",
    "left_neural_foraminal_narrowing": "Left Neural Foraminal Narrowing",
    "right_neural_foraminal_narrowing": "Right Neural Foraminal Narrowing",
    "left_subarticular_stenosis": "Left Subarticular Stenosis",
    "right_subarticular_stenosis": "Right Subarticular Stenosis",
}
TITLE_TO_CONDITION: dict[str, str] = {v: k for k, v in CONDITION_TITLES.items()}

# --- Levels ------------------------------------------------------------------------------
LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
LEVEL_TITLES: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
LEVEL_TITLE_TO_INDEX: dict[str, int] = {t: i for i, t in enumerate(LEVEL_TITLES)}
NUM_LEVELS = len(LEVELS)

# --- Severities ----------------------------------------------------------------------------
SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
SEVERITY_TO_INDEX: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}
# Short names for plots, tables and log lines.
CLASS_NAMES: tuple[str, ...] = ("normal_mild", "moderate", "severe")
NUM_CLASSES = len(SEVERITIES)
# Competition sample weights by true severity; also the loss's class weights.
CLASS_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)
# v8 head bias at initialisation (softmax -> approx. the spinal class balance).
PRIOR_LOGITS: tuple[float, ...] = (2.0, -2.5, -3.0)
# v6 CORAL head bias at initialisation: logits of P(Y>0), P(Y>1).
CORAL_PRIOR_LOGITS: tuple[float, ...] = (-2.0, -2.95)

# --- Series ---------------------------------------------------------------------------------
SERIES_DESCRIPTIONS: tuple[str, ...] = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")
# Which series type carries each condition's labels.
CONDITION_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": "Sagittal T2/STIR",
    "left_neural_foraminal_narrowing": "Sagittal T1",
    "right_neural_foraminal_narrowing": "Sagittal T1",
    "left_subarticular_stenosis": "Axial T2",
    "right_subarticular_stenosis": "Axial T2",
}

# --- Submission and metric ------------------------------------------------------------------
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id", "normal_mild", "moderate", "severe")
SOLUTION_WEIGHT_COLUMN = "sample_weight"
# Groups scored separately by the competition metric, then averaged with any_severe_spinal.
CONDITION_GROUPS: dict[str, tuple[str, ...]] = {
    "spinal": ("spinal_canal_stenosis",),
    "foraminal": ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
    "subarticular": ("left_subarticular_stenosis", "right_subarticular_stenosis"),
}
ANY_SEVERE_SPINAL = "any_severe_spinal"

# --- Real class balance (FACTS.md), used as the synthetic generator's default ------------
CLASS_BALANCE: dict[str, tuple[float, float, float]] = {
    "spinal_canal_stenosis": (0.878, 0.075, 0.048),
    "left_neural_foraminal_narrowing": (0.778, 0.182, 0.040),
    "right_neural_foraminal_narrowing": (0.781, 0.180, 0.039),
    "left_subarticular_stenosis": (0.714, 0.191, 0.095),
    "right_subarticular_stenosis": (0.714, 0.190, 0.096),
}
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
