"""The condition table and the values derived from it, against hand-written expectations."""

from __future__ import annotations

from spinegrade.constants import (
    AXIAL_T2,
    CLASS_NAMES,
    CONDITION_ABBREVIATIONS,
    CONDITION_GROUPS,
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SERIES_DESCRIPTIONS,
    SUBMISSION_COLUMNS,
    TITLE_TO_CONDITION,
    is_sagittal,
)


def test_condition_views_in_train_csv_order():
    assert CONDITIONS == (
        "spinal_canal_stenosis", "left_neural_foraminal_narrowing",
        "right_neural_foraminal_narrowing", "left_subarticular_stenosis",
        "right_subarticular_stenosis",
    )
    assert list(CONDITION_TITLES) == list(CONDITIONS)
    assert CONDITION_TITLES["left_neural_foraminal_narrowing"] == "Left Neural Foraminal Narrowing"
    assert TITLE_TO_CONDITION["Spinal Canal Stenosis"] == "spinal_canal_stenosis"
    assert CONDITION_ABBREVIATIONS["right_subarticular_stenosis"] == "R-SS"


def test_groups_and_series_of_the_competition():
    assert CONDITION_GROUPS == {
        "spinal": ("spinal_canal_stenosis",),
        "foraminal": ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
        "subarticular": ("left_subarticular_stenosis", "right_subarticular_stenosis"),
    }
    assert list(CONDITION_GROUPS) == ["spinal", "foraminal", "subarticular"]  # report order
    assert [CONDITION_SERIES[c] for c in CONDITIONS] == [
        "Sagittal T2/STIR", "Sagittal T1", "Sagittal T1", "Axial T2", "Axial T2"]


def test_series_planes_and_class_names():
    assert SERIES_DESCRIPTIONS == ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")
    assert is_sagittal(SAGITTAL_T1) and is_sagittal(SAGITTAL_T2) and not is_sagittal(AXIAL_T2)
    assert not is_sagittal("Coronal T2")
    assert CLASS_NAMES == ("normal_mild", "moderate", "severe")
    assert SUBMISSION_COLUMNS == ("row_id", "normal_mild", "moderate", "severe")
