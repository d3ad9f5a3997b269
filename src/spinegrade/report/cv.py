"""``cv.md`` and ``report.html`` of a cross-validation: plain data in, text and one HTML page out.

Both read the summary ``engine/cv_results.py`` writes to cv.json; the report adds each run's
metrics.csv (the curves) and puts the folds of a condition side by side: one column per
fold, rows for the curves, the final model's confusion matrix and its per-level recall.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from spinegrade.constants import CLASS_NAMES, SEVERITIES
from spinegrade.io.atomic import atomic_write_text
from spinegrade.report import plots
from spinegrade.report.html import CSS, embed_png

PARTS_TITLE = "part"


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ms(stat: Mapping, digits: int = 3) -> str:
    if stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _score_rows(summary: dict) -> list[list[str]]:
    score = summary["score"]
    rows = []
    for name, iv in score.items():
        if not isinstance(iv, dict) or "estimate" not in iv:
            continue
        n = score["n_scored"].get(name, score["n_studies"]) if name != "total" else score["n_studies"]
        rows.append([name, _num(iv["estimate"], 4), f"[{_num(iv['low'], 4)}, {_num(iv['high'], 4)}]",
                     str(n)])
    return rows


def _condition_rows(summary: dict) -> list[list[str]]:
    rows = []
    for cond, s in summary["per_condition"].items():
        cal = s["calibration"]
        rows.append([cond, _ms(s["final_ba"]), _ms(s["best_epoch_ba"]),
                     *(_ms(s[f"recall_{c}"]) for c in CLASS_NAMES), _ms(s["weighted_logloss"], 4),
                     str(s["n_rows_model"]), str(s["n_rows_prior"]),
                     f"T={cal['temperature']:.3f}, NLL {_num(cal['nll_before'], 4)} -> "
                     f"{_num(cal['nll_after'], 4)}"])
    return rows


CONDITION_HEADER = ["condition", "final (SWA) BA", "best-epoch BA (optimistic)",
                    *(f"recall {s}" for s in SEVERITIES), "weighted log loss", "rows: model",
                    "rows: prior", "OOF calibration"]
SCORE_HEADER = [PARTS_TITLE, "out-of-fold score", "95% interval", "n"]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _intro(summary: dict) -> str:
    sc = summary["score"]
    boot = sc["total"]
    return (f"{summary['folds']} folds (split seed {summary['split_seed']}) x "
            f"{len(summary['seeds'])} seed(s) {summary['seeds']} of config `{summary['config']}`; "
            f"{summary['n_rows']} labelled rows, {summary['n_rows_model']} predicted out of fold "
            f"by a model, the rest by the leave-one-study-out prior. Intervals: 95% percentile "
            f"bootstrap over {sc['n_studies']} studies, {boot['n_boot']} replicates.")


def cv_markdown(summary: dict) -> str:
    """cv.md: the score with intervals and the per-condition table."""
    return "\n".join([
        f"# Cross-validation of {summary['config']}", "", _intro(summary), "",
        "## Competition score of oof.csv (lower is better)", "",
        _md_table(SCORE_HEADER, _score_rows(summary)),
        "## Per condition (mean ± std over folds, std with ddof=1)", "",
        "*final (SWA) BA*: the final model (the checkpoint final.json names; SWA when it ran) "
        "on the held-out fold. *best-epoch BA*: the best epoch's BA, picked on that same fold, "
        "so optimistic; shown for comparison with single-run tables only.", "",
        _md_table(CONDITION_HEADER, _condition_rows(summary))])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _condition_section(cond: str, s: dict, curves: Mapping[tuple, pd.DataFrame], tmp: Path) -> str:
    """One condition: a column per fold with its curves, confusion matrix and per-level recall."""
    cells: dict[str, list[str]] = {"curves (first seed)": [], "confusion (final model)": [],
                                   "per-level recall": []}
    header = []
    for f in s["folds"]:
        k = f["fold"]
        header.append(f"fold {k}: final BA {_num(f['final_ba'])}, best-epoch BA "
                      f"{_num(f['best_epoch_ba'])} (epoch {','.join(map(str, f['best_epoch']))})")
        base = tmp / f"{cond}_fold{k}"
        metrics = curves.get((cond, k, f["seeds"][0]))
        cells["curves (first seed)"].append(
            embed_png(plots.plot_recall(metrics, f"{base}_curves.png")) if metrics is not None else "")
        cells["confusion (final model)"].append(embed_png(plots.plot_confusion(
            f["confusion_matrix"], f"{base}_cm.png", f"{cond} fold {k}")))
        cells["per-level recall"].append(
            embed_png(plots.plot_per_level_recall(f["per_level_recall"], f"{base}_levels.png")))
    head = "<th></th>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{c}</td>" for c in row)
                   + "</tr>" for name, row in cells.items())
    return (f"<h2>{html.escape(cond)}</h2><div class='scroll'><table class='folds'>"
            f"<tr>{head}</tr>{rows}</table></div>")


def build_cv_report(path: str | Path, summary: dict, curves: Mapping[tuple, pd.DataFrame]) -> Path:
    """Write report.html: score table, per-condition table, then each condition's folds.

    Args:
        path: the HTML file to write.
        summary: what cv.json holds.
        curves: ``(condition, fold, seed) -> metrics.csv`` frame of each run.
    """
    path = Path(path)
    parts = [f"<h1>spinegrade cv: {html.escape(summary['config'])}</h1>",
             f"<p class='sub'>{html.escape(_intro(summary))}</p>",
             "<h2>Competition score of oof.csv</h2>", _html_table(SCORE_HEADER, _score_rows(summary)),
             "<h2>Per condition (mean ± std over folds)</h2>",
             _html_table(CONDITION_HEADER, _condition_rows(summary))]
    with tempfile.TemporaryDirectory() as tmp:
        for cond, s in summary["per_condition"].items():
            parts.append(_condition_section(cond, s, curves, Path(tmp)))
    css = CSS + ".folds img{max-width:360px}.folds td{text-align:center}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cv {html.escape(summary['config'])}"
            f"</title><style>{css}</style></head><body>{''.join(parts)}</body></html>")
    atomic_write_text(path, page)
    return path
