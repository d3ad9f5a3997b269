"""``spinegrade inspect`` against hand-computed expectations on fixture series."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_fixtures import write_broken_file, write_series
from spinegrade.cli import main


@pytest.fixture
def images(tmp_path) -> Path:
    """An RSNA-style images folder: study 1 (sagittal + axial), study 2 (two stacks, junk)."""
    root = tmp_path / "train_images"
    # Sagittal, IPP x = -20..20 for k = 0..4, instances [3,1,5,2,4]; normal (-1,0,0) puts
    # k = 4..0 in ascending order, so instances in spatial order = [4,2,5,1,3].
    write_series(root / "1" / "10", orientation="sag", instance_numbers=[3, 1, 5, 2, 4],
                 spacing=10.0, pixel_spacing=(0.5, 0.6), transfer_syntax="j2k",
                 description="Sagittal T1", series_uid="1.1.10")
    # Axial, z = -6, -2, 2, 6 (spacing 4) for k = 0..3, instances reversed: [4,3,2,1].
    write_series(root / "1" / "11", orientation="ax", n=4, order="reversed", spacing=4.0,
                 shape=(40, 48), description="Axial T2", series_uid="1.1.11",
                 transfer_syntax="rle", window=([500, 700], [1000, 1400]))
    # One series, two stacks: sagittal instances 1..6 (x = -12.5..12.5, spacing 5) and
    # axial instances 50..52; plus a text file.
    series = root / "2" / "20"
    write_series(series, orientation="sag", n=6, spacing=5.0, series_uid="1.2.20",
                 description="Sagittal T2/STIR")
    write_series(series, orientation="ax", n=3, start_instance=50, series_uid="1.2.20",
                 description="Sagittal T2/STIR", shape=(16, 16))
    write_broken_file(series / "readme.txt", "text")
    return root


def _inspect_json(path: Path, capsys) -> list[dict]:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_matches_hand_computed_values(images, capsys):
    records = _inspect_json(images, capsys)
    assert [(r["path"], r["orientation"]) for r in records] == [
        (str(images / "1" / "10"), "SAG"), (str(images / "1" / "11"), "AX"),
        (str(images / "2" / "20"), "SAG"), (str(images / "2" / "20"), "AX"),
    ]
    sag, ax, two_sag, two_ax = records
    assert {k: sag[k] for k in (
        "series_instance_uid", "series_description", "n_slices", "rows", "columns",
        "pixel_spacing", "slice_spacing", "transfer_syntax", "instance_order_matches",
        "instances_in_spatial_order", "problems")} == {
        "series_instance_uid": "1.1.10", "series_description": "Sagittal T1", "n_slices": 5,
        "rows": 32, "columns": 32, "pixel_spacing": [0.5, 0.6], "slice_spacing": 10.0,
        "transfer_syntax": "JPEG 2000 Image Compression (Lossless Only)",
        "instance_order_matches": False, "instances_in_spatial_order": [4, 2, 5, 1, 3],
        "problems": []}
    assert (ax["rows"], ax["columns"], ax["slice_spacing"]) == (40, 48, 4.0)
    assert ax["transfer_syntax"] == "RLE Lossless"
    assert ax["instances_in_spatial_order"] == [4, 3, 2, 1]
    assert ax["instance_order"] == "descending" and ax["instance_order_matches"] is False
    # Sagittal: instances ascend with x, the normal is -x, so spatial order is 6..1.
    assert two_sag["instances_in_spatial_order"] == [6, 5, 4, 3, 2, 1]
    assert two_sag["slice_spacing"] == 5.0 and two_sag["n_slices"] == 6
    assert two_ax["instances_in_spatial_order"] == [50, 51, 52]
    assert two_ax["instance_order_matches"] is True
    assert (two_ax["rows"], two_ax["columns"]) == (16, 16)
    for record in (two_sag, two_ax):
        reasons = {(Path(p["file"]).name, p["reason"]) for p in record["problems"]}
        assert ("readme.txt", "not a DICOM file") in reasons
        assert ("20", "folder holds 2 stacks of different orientations: SAG (6 slices), "
                      "AX (3 slices)") in reasons


def test_inspect_accepts_study_and_series_folders(images, capsys):
    assert len(_inspect_json(images / "1", capsys)) == 2
    (record,) = _inspect_json(images / "1" / "11", capsys)
    assert record["series_instance_uid"] == "1.1.11"


def test_inspect_reports_an_unreadable_series_and_goes_on(images, capsys):
    write_broken_file(images / "3" / "30" / "1.dcm", "empty")
    records = _inspect_json(images, capsys)
    assert len(records) == 5
    bad = records[-1]
    assert bad["orientation"] == "unreadable" and bad["n_slices"] == 0
    assert "none of its 1 files is a readable DICOM image: empty file" in \
        bad["problems"][0]["reason"]


def test_inspect_table_is_padded(images, capsys):
    assert main(["inspect", str(images)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header, rows = lines[0], lines[1:5]
    assert header.split()[:3] == ["series", "description", "orient"]
    col = header.index("orient")
    assert [row[col:].split()[0] for row in rows] == ["SAG", "AX", "SAG", "AX"]
    assert rows[0].startswith("1/10") and "JPEG 2000 lossless" in rows[0]
    assert "0.50x0.60" in rows[0] and "10.00" in rows[0] and "shuffled" in rows[0]
    assert "reversed" in rows[1] and "40x48" in rows[1]
    assert "problems:" in lines
    # The junk file is listed once although series 2/20 has two stacks.
    assert sum("readme.txt: not a DICOM file" in line for line in lines) == 1


def test_inspect_missing_path_is_a_user_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Traceback" not in err


def test_inspect_json_has_no_nan(tmp_path, capsys):
    write_series(tmp_path / "s", drop_tags=["ImagePositionPatient", "PixelSpacing"])
    (record,) = _inspect_json(tmp_path / "s", capsys)
    assert record["orientation"] == "unknown"
    assert record["slice_spacing"] is None and record["pixel_spacing"] == [None, None]
    assert record["n_slices"] == 5  # write_series default: 5 slices
