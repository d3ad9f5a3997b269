"""The run report: figures from a run folder, gathered into one self-contained HTML page."""

from __future__ import annotations

import json
import re

import pandas as pd

from spinegrade.config import EvalConfig
from spinegrade.engine.monitor import health_table
from spinegrade.report import build_report


def _fake_run(tmp_path):
    rows = []
    bas = [0.41, 0.62, 0.71, 0.69, 0.73]
    for e, ba in enumerate(bas, start=1):
        cm = [[50, 3, 1], [4, 6, 2], [1, 1, 4 + e]]
        rows.append(dict(
            epoch=e, phase="frozen" if e <= 2 else "finetune", train_loss=1.0 / e,
            val_loss=1.1 / e, balanced_accuracy=ba, recall_normal_mild=0.95 if e == 5 else 0.9,
            recall_moderate=0.5, recall_severe=0.6, pred_count_normal_mild=55,
            pred_count_moderate=10, pred_count_severe=8, weighted_logloss=0.8 / e,
            dead_classes="[]" if e != 1 else '["moderate"]', confusion_matrix=json.dumps(cm),
            slice_weights=json.dumps([0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1]), seconds=3.0))
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    # health.json exactly as fit writes it (engine/train.py: {"epoch", "items"}).
    (tmp_path / "health.json").write_text(json.dumps(
        {"epoch": 5, "items": health_table(rows, EvalConfig())}))
    (tmp_path / "config.yaml").write_text("name: fake\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({
        "balanced_accuracy": 0.75, "recall": {"normal_mild": 0.9, "moderate": 0.6, "severe": 0.75},
        "confusion_matrix": [[9, 1, 0], [1, 3, 1], [0, 1, 3]], "weighted_logloss": 0.5,
        "n_samples": 19, "tta": True,
        "per_level_recall": {"l1_l2": {"normal_mild": 1.0, "moderate": 0.5, "severe": 1.0}}}))
    return tmp_path


def test_report_embeds_figures_and_best_epoch(tmp_path):
    run = _fake_run(tmp_path)
    page = build_report(run).read_text()
    # Self-contained: every figure inline, no external references.
    images = re.findall(r'<img src="data:image/png;base64,', page)
    assert len(images) == 6  # loss, recall, best confusion, slice weights, eval confusion, levels
    assert "src=\"http" not in page
    # Best BA is 0.73 at epoch 5 (the max of the series above), last BA too.
    assert re.search(r"best val BA<b>0\.730</b>epoch 5", page)
    # One epoch had a dead class.
    assert re.search(r"dead-class epochs<b>1</b>alarm", page)
    # Health after epoch 5 (EvalConfig defaults), by hand: min recall 0.5 > 30% pass; BA
    # spread 0.73 - 0.41 = 0.32 >= 3% warn; Normal/Mild recall 0.95 > 90% alarm; loss gap
    # 0.22 - 0.20 = 0.02 < 0.05 pass; Moderate & Severe min 0.5 (not > 50%, not < 30%) warn;
    # no dead class pass. The alarm row, and only it, is red; the warn rows amber.
    health = json.loads((run / "health.json").read_text())
    assert {it["item"]: it["status"] for it in health["items"]} == {
        "min class recall": "pass", "BA spread": "warn", "Normal/Mild recall": "alarm",
        "train-val loss gap": "pass", "Moderate & Severe recall (min)": "warn",
        "dead classes": "pass"}
    alarm_rows = re.findall(r'<tr style="background:#f8d7da"><td class="l">([^<]*)</td>', page)
    assert alarm_rows == ["Normal/Mild recall"]
    warn_rows = re.findall(r'<tr style="background:#fff3cd"><td class="l">([^<]*)</td>', page)
    assert warn_rows == ["BA spread", "Moderate &amp; Severe recall (min)"]
    assert len(re.findall(r'<tr style="background:#d4edda">', page)) == 3
    for name in ("loss", "recall", "confusion_best", "slice_weights", "confusion_eval"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000


def test_report_with_only_a_config(tmp_path):
    (tmp_path / "config.yaml").write_text("name: empty\n")
    page = build_report(tmp_path).read_text()
    assert "No health table recorded" in page
    assert "<img" not in page
