"""The Problem type and problems.csv: named constructors, absent ids, the exact file format."""

from __future__ import annotations

from spinegrade.problems import Problem, Severity, read_problems, write_problems


def test_problems_csv_is_written_exactly(tmp_path):
    problems = [
        Problem.skipped(kind="empty_label", study_id=7, file="train.csv", row=3,
                        message="no label for spinal_canal_stenosis l1_l2"),
        Problem.warning(kind="no_series", study_id=7, message="no readable Axial T2 series"),
    ]
    write_problems(tmp_path / "p.csv", problems)
    # Absent ids and rows are -1 on disk (the format older files have); severity is its text.
    assert (tmp_path / "p.csv").read_bytes() == (
        b"study_id,series_id,file,row,kind,severity,message\r\n"
        b"7,-1,train.csv,3,empty_label,skipped,no label for spinal_canal_stenosis l1_l2\r\n"
        b"7,-1,,-1,no_series,warning,no readable Axial T2 series\r\n")
    again = read_problems(tmp_path / "p.csv")
    assert again == problems
    assert again[1].series_id is None and again[1].row is None and again[1].file == ""


def test_severity_is_its_string_and_plain_strings_are_accepted():
    p = Problem(kind="x", severity="warning", message="m")  # as read back from a JSON marker
    assert p.severity is Severity.WARNING and p.severity == "warning" and str(p.severity) == "warning"
    assert Problem.warning(kind="x", message="m") == p
    assert Problem.skipped(kind="x", message="m").sort_key() == (-1, -1, "", -1, "x", "m")
