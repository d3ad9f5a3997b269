"""The sample index built from hand-written competition CSVs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from spinegrade.constants import LEVELS, TRAIN_COLUMNS, train_column
from spinegrade.data.rsna import build_index
from spinegrade.errors import UserError
from spinegrade.problems import read_problems, write_problems

SPINAL = "spinal_canal_stenosis"


def _write(root: Path, train_rows: list[dict], coords: list[str], series: list[str],
           folders: list[tuple[int, int]]) -> Path:
    lines = [",".join(TRAIN_COLUMNS)]
    for r in train_rows:
        lines.append(",".join(str(r.get(c, "")) for c in TRAIN_COLUMNS))
    lines += [",," + "," * 20, ""]  # blank trailing rows as in some published copies
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "train_label_coordinates.csv").write_text(
        "study_id,series_id,instance_number,condition,level,x,y\n" + "\n".join(coords) + "\n")
    (root / "train_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n" + "\n".join(series) + "\n")
    for study, s in folders:
        (root / "train_images" / str(study) / str(s)).mkdir(parents=True, exist_ok=True)
    return root


def _labels(study: int, values: list[str], condition: str = SPINAL) -> dict:
    return {"study_id": study, **{train_column(condition, lv): v for lv, v in zip(LEVELS, values, strict=True)}}


@pytest.fixture
def data_dir(tmp_path):
    train = [
        _labels(1, ["Normal/Mild", "Moderate", "Severe", "", "Normal/Mild"]),
        _labels(2, ["Normal/Mild"] * 5),
        _labels(3, ["Severe"] * 5),
        _labels(4, ["Moderate"] * 5),
    ]
    coords = [
        # study 1: one point per level on different instances; L4/L5 label is empty.
        "1,10,3,Spinal Canal Stenosis,L1/L2,10.5,20.0",
        "1,10,4,Spinal Canal Stenosis,L2/L3,11.0,21.0",
        "1,10,5,Spinal Canal Stenosis,L3/L4,12.0,22.0",
        "1,10,5,Spinal Canal Stenosis,L4/L5,13.0,23.0",
        # L5/S1 has no coordinates -> no_coordinates; a foraminal point is ignored.
        "1,11,7,Left Neural Foraminal Narrowing,L1/L2,5.0,5.0",
        # study 2: series folder missing on disk; study 3: series not in the descriptions CSV.
        "2,20,1,Spinal Canal Stenosis,L1/L2,1.0,1.0",
        "3,30,1,Spinal Canal Stenosis,L1/L2,1.0,1.0",
        # study 4: negative coordinate, missing y, unknown level, unknown condition,
        # a good point on a series with an odd description, repeated identically (kept
        # once), and two disagreeing points for L5/S1 (left out, not resolved by order).
        "4,40,2,Spinal Canal Stenosis,L1/L2,-3.0,4.0",
        "4,40,2,Spinal Canal Stenosis,L2/L3,3.0,",
        "4,40,2,Spinal Canal Stenosis,L6/S2,3.0,4.0",
        "4,40,2,Spinal Stenosis,L3/L4,3.0,4.0",
        "4,40,2,Spinal Canal Stenosis,L4/L5,3.0,4.0",
        "4,40,2,Spinal Canal Stenosis,L4/L5,3.0,4.0",
        "4,40,2,Spinal Canal Stenosis,L5/S1,3.0,4.0",
        "4,40,3,Spinal Canal Stenosis,L5/S1,9.0,9.0",
        # a study with coordinates but no train.csv row.
        "5,50,1,Spinal Canal Stenosis,L1/L2,1.0,1.0",
    ]
    series = ["1,10,Sagittal T2/STIR", "1,11,Sagittal T1", "2,20,Sagittal T2/STIR",
              "4,40,Sagittal T2 FLAIR", "5,50,Sagittal T2/STIR"]
    return _write(tmp_path, train, coords, series, [(1, 10), (1, 11), (3, 30), (4, 40), (5, 50)])


def test_index_rows_and_types(data_dir):
    index, _ = build_index(data_dir, SPINAL)
    assert index[["study_id", "level", "instance_number", "label"]].values.tolist() == [
        [1, "l1_l2", 3, 0], [1, "l2_l3", 4, 1], [1, "l3_l4", 5, 2], [4, "l4_l5", 2, 1],
    ]
    assert index["level_idx"].tolist() == [0, 1, 2, 3]
    assert index.loc[0, ["x", "y"]].tolist() == [10.5, 20.0]
    assert (index["condition"] == SPINAL).all()
    assert str(index["study_id"].dtype) == "int64"


def test_every_left_out_row_is_a_problem(data_dir):
    _, problems = build_index(data_dir, SPINAL)
    kinds = Counter(p.kind for p in problems)
    assert kinds == Counter({
        "empty_label": 1,             # study 1 L4/L5 (its point then has no label)
        "no_label": 2,                # study 1 L4/L5 point, study 5 (not in train.csv)
        # study 1 L5/S1; studies 2 and 3 L2/L3..L5/S1; study 4 levels whose points were bad
        # (L5/S1, whose two points disagree, is reported as that).
        "no_coordinates": 1 + 4 + 4 + 3,
        "missing_series": 1,          # study 2: folder absent
        "unknown_series": 1,          # study 3: not in the descriptions CSV
        "coordinate_out_of_image": 1,  # negative x
        "missing_coordinate": 1,      # empty y
        "unknown_level": 1,
        "unknown_condition": 1,
        "duplicate_coordinate": 2,    # the identical repeat, the disagreeing pair
        "unknown_series_description": 1,
        "unexpected_series_type": 1,  # Sagittal T2 FLAIR kept with a warning
    })
    by_kind = {p.kind: p for p in problems}
    dups = sorted((p for p in problems if p.kind == "duplicate_coordinate"), key=lambda p: p.row)
    assert [(p.row, p.severity) for p in dups] == [(13, "warning"), (15, "skipped")]
    assert "rows 12 and 13" in dups[0].message and "rows 14 and 15" in dups[1].message
    assert by_kind["unexpected_series_type"].severity == "warning"
    assert by_kind["empty_label"].severity == "skipped" and by_kind["empty_label"].study_id == 1


def test_duplicate_study_rows_agreeing_cells_once_conflicting_cells_left_out(tmp_path):
    """A second train.csv row for a study never silently replaces the first one's labels."""
    first = ["Normal/Mild", "Moderate", "Severe", "Normal/Mild", "Moderate"]
    second = ["Normal/Mild", "Severe", "Severe", "", "Moderate"]  # L2/L3 and L4/L5 disagree
    coords = [f"7,70,{i + 1},Spinal Canal Stenosis,{t},5.0,5.0"
              for i, t in enumerate(["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"])]
    root = _write(tmp_path, [_labels(7, first), _labels(8, ["Normal/Mild"] * 5),
                             _labels(7, second)], coords, ["7,70,Sagittal T2/STIR"], [(7, 70)])
    index, problems = build_index(root, SPINAL)
    assert index[["level", "label"]].values.tolist() == [["l1_l2", 0], ["l3_l4", 2],
                                                          ["l5_s1", 1]]
    conflicts = sorted((p for p in problems if p.kind == "conflicting_duplicate"),
                       key=lambda p: p.message)
    assert [p.severity for p in conflicts] == ["skipped", "skipped"]
    assert "l2_l3" in conflicts[0].message and "l4_l5" in conflicts[1].message
    for p in conflicts:  # both row numbers, and what each said
        assert p.study_id == 7 and p.row == 3 and "row 1:" in p.message and "row 3:" in p.message
    assert "row 1: Moderate, row 3: Severe" in conflicts[0].message
    assert "row 3: empty" in conflicts[1].message
    (dup,) = [p for p in problems if p.kind == "duplicate_study"]
    assert (dup.study_id, dup.row, dup.severity) == (7, 3, "warning")
    assert "rows 1 and 3" in dup.message
    # Their points are reported as having no usable label (as for an empty label), once each.
    assert sorted(p.row for p in problems if p.kind == "no_label") == [2, 4]


def test_other_condition_and_errors(data_dir, tmp_path):
    index, _ = build_index(data_dir, "left_neural_foraminal_narrowing")
    assert index.empty  # no train.csv labels for that condition in this fixture
    with pytest.raises(UserError, match="unknown condition"):
        build_index(data_dir, "spinal")
    with pytest.raises(UserError, match="train.csv"):
        build_index(tmp_path / "nowhere", SPINAL)


def test_problems_csv_round_trip(data_dir, tmp_path):
    _, problems = build_index(data_dir, SPINAL)
    write_problems(tmp_path / "p.csv", problems)
    assert read_problems(tmp_path / "p.csv") == problems
