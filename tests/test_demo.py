"""``spinegrade demo`` end to end on a handful of studies, and its resumability."""

from __future__ import annotations

import json

import pytest

from spinegrade.cli import main

SMALL = ["--set", "train.epochs=2", "--set", "train.swa_start_epoch=2", "--set", "data.folds=3",
         "--set", "data.img_size=32"]


@pytest.mark.slow
def test_demo_runs_every_stage_then_skips_them(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--studies", "9", "--workers", "1", "--max-matrix", "128",
            *SMALL]
    assert main(args) == 0
    text = capsys.readouterr().out
    for stage in ("synth", "prepare", "train", "evaluate", "report"):
        assert f"{stage}: " in text and (out / f".done-{stage}.json").is_file()
    assert "balanced accuracy" in text and "report: " in text
    assert (out / "run/report.html").is_file()
    metrics = json.loads((out / "run/eval/metrics.json").read_text())
    assert metrics["tta"] is True and metrics["checkpoint"] == "swa"

    assert main(args) == 0  # everything done: every stage skipped
    again = capsys.readouterr().out
    assert again.count("skipped") == 5
