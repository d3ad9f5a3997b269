"""A single self-contained ``report.html`` for a run folder (figures embedded as base64)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from spinegrade.constants import CLASS_NAMES, SEVERITIES
from spinegrade.engine import run_folder as rf
from spinegrade.engine.calibrate import load_calibration, oof_arrays
from spinegrade.engine.run_folder import RunFolder
from spinegrade.io.atomic import atomic_write_text
from spinegrade.metrics import sample_weights
from spinegrade.report import plots
from spinegrade.report.calibration import plot_reliability

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:4px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:1.5em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.figs img{width:540px;max-width:100%;height:auto;flex:0 0 auto;border:1px solid #eee}
.alarm{color:#b00020;font-weight:bold}.scroll{overflow-x:auto}
"""


def embed_png(path: Path) -> str:
    """An <img> tag carrying the PNG at ``path`` inline (base64), for self-contained pages."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _table(df: pd.DataFrame, status_col: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        style = ""
        if status_col and status_col in r:
            colour = plots.STATUS_COLOURS.get(str(r[status_col]).lower(), "")
            style = f' style="background:{colour}"' if colour else ""
        cells = "".join(
            f'<td class="l">{html.escape(str(v))}</td>' if isinstance(v, str)
            else f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
            for v in r.values
        )
        rows.append(f"<tr{style}>{cells}</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _figures(run: RunFolder, metrics: pd.DataFrame | None, evaluation: dict | None) -> list[Path]:
    """Write every figure the run's files allow into ``run/plots`` and return their paths."""
    out = run.plots
    out.mkdir(exist_ok=True)
    figs: list[Path] = []
    if metrics is not None and len(metrics):
        figs.append(plots.plot_losses(metrics, out / rf.LOSS_PNG))
        figs.append(plots.plot_recall(metrics, out / rf.RECALL_PNG))
        if "confusion_matrix" in metrics:
            best = _best_row(metrics)
            cm = json.loads(metrics.loc[best, "confusion_matrix"])
            epoch = int(metrics.loc[best, "epoch"])
            figs.append(plots.plot_confusion(cm, out / rf.CONFUSION_BEST_PNG,
                                             f"validation, best epoch ({epoch})"))
        if "slice_weights" in metrics:
            w = [x for x in plots.parse_json_column(metrics["slice_weights"]) if x]
            if w:
                figs.append(plots.plot_slice_weights(w, out / rf.SLICE_WEIGHTS_PNG))
    if evaluation:
        tta = "with TTA" if evaluation.get("tta") else "no TTA"
        figs.append(plots.plot_confusion(evaluation["confusion_matrix"],
                                         out / rf.CONFUSION_EVAL_PNG, f"evaluate ({tta})"))
        if evaluation.get("per_level_recall"):
            figs.append(plots.plot_per_level_recall(evaluation["per_level_recall"],
                                                    out / rf.PER_LEVEL_RECALL_PNG))
    return figs


def _best_row(metrics: pd.DataFrame) -> int:
    col = "balanced_accuracy" if "balanced_accuracy" in metrics else metrics.columns[-1]
    return int(metrics[col].astype(float).idxmax())


def _cards(metrics: pd.DataFrame | None, evaluation: dict | None, final: dict | None) -> str:
    """Headline numbers, each saying which model, which data and whether TTA was used."""
    cards = []
    if metrics is not None and len(metrics) and "balanced_accuracy" in metrics:
        best = _best_row(metrics)
        cards.append(("best-epoch val BA", f"{metrics.loc[best, 'balanced_accuracy']:.3f}",
                      f"epoch {int(metrics.loc[best, 'epoch'])}, no TTA"))
        last = metrics.iloc[-1]
        cards.append(("last-epoch val BA", f"{last['balanced_accuracy']:.3f}",
                      f"epoch {int(last['epoch'])}, no TTA"))
        if "weighted_logloss" in metrics:
            cards.append(("last-epoch val weighted log loss", f"{last['weighted_logloss']:.3f}",
                          f"epoch {int(last['epoch'])}, no TTA"))
        dead = [str(d) for d in metrics.get("dead_classes", pd.Series(dtype=str)).fillna("")
                if str(d) not in ("", "[]", "nan")]
        cards.append(("dead-class epochs", str(len(dead)), "alarm" if dead else "none"))
    if final and isinstance(final.get("swa"), dict):
        sw = final["swa"]
        cards.append(("SWA model val BA", f"{sw['balanced_accuracy']:.3f}",
                      f"{sw.get('n_averaged', '?')} epochs averaged, no TTA"))
    if evaluation:
        tta = "TTA" if evaluation.get("tta") else "no TTA"
        cards.append((f"evaluate BA ({evaluation.get('checkpoint', '?')} checkpoint)",
                      f"{evaluation['balanced_accuracy']:.3f}",
                      f"{tta}, {evaluation.get('n_samples', '?')} samples"))
        if "competition_score" in evaluation:
            cards.append(("competition score (partial)", f"{evaluation['competition_score']:.4f}",
                          _competition_caption(evaluation)))
    return "".join(f'<div class="card">{html.escape(t)}<b>{v}</b>{html.escape(s)}</div>'
                   for t, v, s in cards)


def _competition_caption(evaluation: dict) -> str:
    """Which parts of the four-part competition metric this score averages, on what data."""
    parts = [k for k, v in (evaluation.get("competition") or {}).items()
             if k != "score" and isinstance(v, float)]
    covered = " + ".join(p.replace("_", " ") for p in parts) or "this condition's part"
    return (f"mean of {covered} only (this condition), on {evaluation.get('scored', 'the scored rows')}; "
            "lower is better")


def _metrics_table(metrics: pd.DataFrame) -> str:
    keep = [c for c in ("epoch", "phase", "train_loss", "val_loss", "balanced_accuracy")
            if c in metrics]
    keep += [f"recall_{n}" for n in CLASS_NAMES if f"recall_{n}" in metrics]
    keep += [f"pred_count_{n}" for n in CLASS_NAMES if f"pred_count_{n}" in metrics]
    keep += [c for c in ("weighted_logloss", "dead_classes", "seconds") if c in metrics]
    return _table(metrics[keep])


def _health_html(health) -> str:
    if not health:
        return "<p>No health table recorded.</p>"
    rows = health.get("items", health) if isinstance(health, dict) else health
    df = pd.DataFrame(rows)
    status = next((c for c in ("status", "result", "state") if c in df), None)
    names = {"item": "metric", "value": "value", "std": "std", "status": "status",
             "target": "healthy range", "alarm": "alarm"}
    df = df[[c for c in names if c in df]].rename(columns=names)
    # The BA row's value is the spread of the last epochs; std is only that row's.
    df = df.astype(object).where(df.notna(), "")
    epoch = health.get("epoch") if isinstance(health, dict) else None
    caption = f"<p>After epoch {epoch}; the plan's \"Metrics to watch\".</p>" if epoch else ""
    return caption + _table(df, status and names.get(status, status))


def _weights_html(info: dict) -> str:
    """run.json's record of where the backbone's weights came from."""
    w = info.get("backbone_weights")
    if not w:
        return ""
    if w.get("source") == "file":
        text = f"local file {w.get('detail')} (sha256 {w.get('sha256')})"
    elif w.get("source") == "hub":
        text = f"timm hub {w.get('detail')} (timm {w.get('timm_version')})"
    else:
        text = f"random initialisation: {w.get('detail')}"
    if w.get("random_stem_channels"):
        text += f"; {w['random_stem_channels']} stem channels randomly initialised"
    return f"<p>Backbone {html.escape(str(w.get('backbone', '')))} weights: {html.escape(text)}</p>"


def _title(run: RunFolder, info: dict) -> str:
    """``<config name>, fold k`` from the run's files (the folder name is often just 'run')."""
    name = ""
    if run.config.is_file():
        name = str((yaml.safe_load(run.config.read_text()) or {}).get("name") or "")
    parts = [name or run.root.name]
    if info.get("fold") is not None:
        parts.append(f"fold {info['fold']}")
    return ", ".join(parts)


def _final_html(final: dict | None) -> str:
    if not final or not final.get("final_checkpoint"):
        return ""
    return (f"<p>Final model: the <b>{html.escape(str(final['final_checkpoint']))}</b> "
            "checkpoint (SWA when it ran, else the best epoch); out-of-fold predictions, "
            "<code>evaluate</code> and <code>predict</code> all use it by default.</p>")


def _calibration_section(run: RunFolder) -> tuple[list[Path], list[str]]:
    """The reliability diagram of oof.csv before/after calibration.json, and its table."""
    rc = load_calibration(run) if run.oof.is_file() else None
    if rc is None:
        return [], []
    probs, labels, levels = oof_arrays(pd.read_csv(run.oof))
    after = rc.probs(probs, levels)
    weights = sample_weights(labels)
    png = plot_reliability(probs, after, labels, run.plots / rf.RELIABILITY_PNG,
                           weights=weights, title="out-of-fold, weights 1/2/4 by true grade")
    c = rc.calibration
    table = pd.DataFrame([
        {"": "before", "weighted log loss": c.nll_before, "ECE": c.ece_before},
        {"": "after", "weighted log loss": c.nll_after, "ECE": c.ece_after}])
    bias = ", ".join(f"{b:+.3f}" for b in c.bias)
    text = (f"<p>{html.escape(rc.method)} fitted on {c.n} out-of-fold predictions of the "
            f"{html.escape(rc.checkpoint)} checkpoint: temperature {c.temperature:.3f}, "
            f"bias [{bias}], prior mix {c.prior_mix:.3f} (applied by evaluate and predict; "
            "ECE of the top-label confidence, 1/2/4-weighted)</p>")
    if c.cv_nll:
        cv = ", ".join(f"{html.escape(k)} {v:.4f}" for k, v in c.cv_nll.items())
        text += (f"<p>Stages kept: {html.escape(', '.join(c.kept or ()) or 'none')}; each "
                 f"only where it lowered the weighted log loss cross-fitted over {c.folds} "
                 f"folds of the studies ({cv})</p>")
    return [png], ["<h2>Calibration</h2>", text, _table(table)]


def build_report(run_dir: str | Path) -> Path:
    """Make the run's figures and gather them, with its tables, into ``run_dir/report.html``.

    Reads what the run folder holds (config.yaml, metrics.csv, health.json, eval/metrics.json);
    sections whose files are missing are left out.
    """
    run = RunFolder(run_dir)
    metrics = pd.read_csv(run.metrics) if run.metrics.is_file() else None
    evaluation = _read_json(run.eval_dir / rf.EVAL_METRICS_FILE)
    health = _read_json(run.health)
    final = _read_json(run.final)
    info = run.read_info()
    config_text = run.config.read_text() if run.config.is_file() else ""
    figs = _figures(run, metrics, evaluation)
    cal_fig, cal_html = _calibration_section(run)
    figs += cal_fig
    name = _title(run, info)

    parts = [f"<h1>spinegrade run: {html.escape(name)}</h1>",
             f'<p class="sub">{html.escape(str(run.root.resolve()))}</p>',
             _weights_html(info), _final_html(final),
             f'<div class="cards">{_cards(metrics, evaluation, final)}</div>',
             "<h2>Health table</h2>", _health_html(health),
             "<h2>Figures</h2>", '<div class="figs">', *(embed_png(f) for f in figs), "</div>"]
    if metrics is not None and len(metrics):
        parts += ["<h2>Per-epoch validation metrics</h2>", _metrics_table(metrics)]
    if evaluation:
        recall = evaluation.get("recall", {})
        rec = ", ".join(f"{s}: {recall.get(n, np.nan):.3f}" for n, s in zip(CLASS_NAMES, SEVERITIES, strict=True))
        tta = "with TTA" if evaluation.get("tta") else "no TTA"
        parts += ["<h2>Evaluation</h2>",
                  f"<p>{html.escape(str(evaluation.get('checkpoint', '?')))} checkpoint, {tta}, "
                  f"{html.escape(str(evaluation.get('scored', '')))}: "
                  f"balanced accuracy {evaluation['balanced_accuracy']:.4f}; recall {rec}; "
                  f"weighted log loss {evaluation.get('weighted_logloss', float('nan')):.4f}</p>"]
    parts += cal_html
    if config_text:
        parts += ["<h2>Resolved config</h2>",
                  f"<details><summary>{rf.CONFIG_FILE}</summary><pre>{html.escape(config_text)}</pre>"
                  "</details>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    atomic_write_text(run.report, page)
    return run.report
