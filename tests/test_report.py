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
    assert re.search(r"best-epoch val BA<b>0\.730</b>epoch 5, no TTA", page)
    # One epoch had a dead class.
    assert re.search(r"dead-class epochs<b>1</b>alarm", page)
    # Health after epoch 5 (EvalConfig defaults), by hand: min recall 0.5 > 30% pass; BA
    # spread 0.73 - 0.41 = 0.32 > 5% alarm; Normal/Mild recall 0.95 > 90% alarm; loss gap
    # 0.22 - 0.20 = 0.02 < 0.05 pass; Moderate 0.5 (not > 50%, not < 30%) warn; Severe 0.6
    # pass. The alarm rows, and only they, are red; the warn row amber.
    health = json.loads((run / "health.json").read_text())
    assert {it["item"]: it["status"] for it in health["items"]} == {
        "Min class recall": "pass", "Balanced accuracy": "alarm", "Normal/Mild recall": "alarm",
        "Train-val loss gap": "pass", "Moderate recall": "warn", "Severe recall": "pass"}
    alarm_rows = re.findall(r'<tr style="background:#f8d7da"><td class="l">([^<]*)</td>', page)
    assert alarm_rows == ["Balanced accuracy", "Normal/Mild recall"]
    warn_rows = re.findall(r'<tr style="background:#fff3cd"><td class="l">([^<]*)</td>', page)
    assert warn_rows == ["Moderate recall"]
    assert len(re.findall(r'<tr style="background:#d4edda">', page)) == 3
    # The BA row shows the spread (0.32) and the std of 0.41 .. 0.73 (population, by hand).
    bas = [0.41, 0.62, 0.71, 0.69, 0.73]
    std = (sum((b - sum(bas) / 5) ** 2 for b in bas) / 5) ** 0.5
    assert f"<td>0.32</td><td>{std:.4g}</td>" in page
    assert "<th>healthy range</th><th>alarm</th>" in page
    for name in ("loss", "recall", "confusion_best", "slice_weights", "confusion_eval"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000


def test_report_with_only_a_config(tmp_path):
    (tmp_path / "config.yaml").write_text("name: empty\n")
    page = build_report(tmp_path).read_text()
    assert "No health table recorded" in page
    assert "<img" not in page


def test_report_labels_every_number_and_names_the_run(tmp_path):
    (tmp_path / "run").mkdir()
    run = _fake_run(tmp_path / "run")
    (run / "config.yaml").write_text("name: demo\n")
    (run / "run.json").write_text(json.dumps({"fold": 2, "backbone_weights": {
        "source": "file", "detail": "/w/effnet.pth", "sha256": "ab12", "backbone": "tiny",
        "timm_version": "1.0", "random_stem_channels": 0}}))
    (run / "final.json").write_text(json.dumps({"final_checkpoint": "swa", "swa": {
        "balanced_accuracy": 0.7, "n_averaged": 4}}))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    metrics.update(checkpoint="swa", scored="validation fold 2", competition_score=0.41,
                   competition={"spinal": 0.3, "any_severe_spinal": 0.52, "foraminal": None,
                                "score": 0.41})
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    page = build_report(run).read_text()
    assert "<h1>spinegrade run: demo, fold 2</h1>" in page   # not the folder name 'run'
    assert "weights: local file /w/effnet.pth (sha256 ab12)" in page
    assert "Final model: the <b>swa</b> checkpoint" in page
    assert "SWA model val BA<b>0.700</b>4 epochs averaged, no TTA" in page
    assert "evaluate BA (swa checkpoint)<b>0.750</b>TTA, 19 samples" in page
    assert ("competition score (partial)<b>0.4100</b>mean of spinal + any severe spinal only "
            "(this condition), on validation fold 2; lower is better") in page
    # Figures keep their aspect ratio in the flex row (no stretched heights).
    assert ".figs img{width:540px;max-width:100%;height:auto" in page
    assert "align-items:flex-start" in page
