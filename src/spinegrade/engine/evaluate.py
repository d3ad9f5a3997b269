"""Re-score a run's checkpoint, with or without TTA, on its validation fold or another cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinegrade.competition import condition_score
from spinegrade.constants import CLASS_NAMES, LEVELS
from spinegrade.data.dataset import CropDataset
from spinegrade.engine import run_folder as rf
from spinegrade.engine.calibrate import load_calibration
from spinegrade.engine.distributed import shard
from spinegrade.engine.loop import Settings, _loader, make_run_model, seed_everything
from spinegrade.engine.rerun import open_run_cache
from spinegrade.engine.run_folder import RunFolder
from spinegrade.engine.split import load_split, rows_for_fold
from spinegrade.engine.train import evaluate
from spinegrade.engine.tta import tta_views
from spinegrade.metrics import summarize

log = logging.getLogger(__name__)


def per_level_recall(labels: np.ndarray, preds: np.ndarray, levels: np.ndarray) -> dict:
    """``{level name: {class name: recall}}``; a class absent at a level is left out."""
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(LEVELS):
        at = levels == k
        rec = {}
        for c, cname in enumerate(CLASS_NAMES):
            true_c = at & (labels == c)
            if true_c.any():
                rec[cname] = float((preds[true_c] == c).mean())
        if at.any():
            out[name] = rec
    return out


def _rows_to_score(run: RunFolder, cache_arg: str | Path | None, fold: int
                   ) -> tuple[Any, np.ndarray, str]:
    """The cache to read and its rows: the run's validation fold, or all of another cache."""
    cache = open_run_cache(run, cache_arg)
    run_cache = run.read_info().get("cache")
    if run_cache and Path(cache.path).resolve() == Path(run_cache).resolve():
        _, val_rows = rows_for_fold(cache.index, load_split(run.root), fold)
        return cache, val_rows, f"validation fold {fold}"
    return cache, cache.index["row"].to_numpy(), f"all of {cache.path}"


def evaluate_run(run_dir: str | Path, cache: str | Path | None = None, checkpoint: str = "final",
                 tta: bool = True, out_dir: str | Path | None = None,
                 calibrate: bool = True) -> dict[str, Any]:
    """Score ``checkpoint`` of a run and write metrics.json, predictions.csv and figures.

    Args:
        run_dir: a training run folder.
        cache: another crop cache to score entirely; default the run's own cache, scored on
            its validation fold (passing the run's own cache also scores that fold).
        checkpoint: final (the one ``final.json`` names: SWA when it ran, else best; the
            model of oof.csv and of ``predict``'s default) / best / last / swa.
        tta: average the TTA views of ``eval.tta_brightness`` and ``eval.tta_scales``.
        out_dir: where to write (default ``run_dir/eval``).
        calibrate: apply the run's calibration.json (temperature, bias, prior mix) to the
            probabilities before scoring them; the uncalibrated figures are kept under
            ``calibration``.

    Returns:
        The metrics written to metrics.json.
    """
    run = RunFolder(run_dir)
    checkpoint = run.final_checkpoint() if checkpoint == "final" else checkpoint
    ck = rf.read_checkpoint(run.checkpoint(checkpoint))
    cfg = ck.cfg
    s = Settings.from_config(cfg, ck.fold)
    seed_everything(cfg.train.seed, s.deterministic)
    data, rows, what = _rows_to_score(run, cache, s.fold)
    model, loss_fn = make_run_model(cfg, data, s, for_inference=True)
    model.load_state_dict(ck.model)
    shard_rows = shard(rows, s.dist)
    loader = _loader(CropDataset(data, shard_rows), cfg.eval.batch_size, cfg, s, shuffle=False)
    views = tta_views(cfg.eval.tta_brightness, cfg.eval.tta_scales) if tta else tta_views()
    pred = evaluate(model, loader, loss_fn, s, views)
    pred, calibration = _calibrated(run, pred, data.index, cfg.data.condition, checkpoint,
                                    calibrate)
    metrics = _metrics(pred, checkpoint, tta, len(views), what, ck.epoch)
    metrics["calibration"] = calibration
    metrics["competition"] = _competition(pred, data.index, cfg.data.condition)
    metrics["competition_score"] = metrics["competition"]["score"]
    if s.is_main:
        _write(Path(out_dir) if out_dir else run.eval_dir, metrics, pred, data.index)
    return metrics


def _calibrated(run: RunFolder, pred: dict, index: pd.DataFrame, condition: str,
                checkpoint: str, calibrate: bool) -> tuple[dict, dict]:
    """``pred`` with the run's calibration applied, and what was applied (with the
    uncalibrated weighted log loss and competition score, for comparison)."""
    rc = load_calibration(run, checkpoint) if calibrate else None
    if rc is None:
        return pred, {"applied": False}
    raw = _competition(pred, index, condition)
    info = {"applied": True, "fitted_on": rc.checkpoint, "method": rc.method,
            **rc.calibration.to_dict(),
            "uncalibrated_weighted_logloss": summarize(pred["label"], pred["probs"])[
                "weighted_logloss"],
            "uncalibrated_competition_score": raw["score"]}
    return {**pred, "probs": rc.probs(pred["probs"], pred["level"])}, info


def _metrics(pred: dict, checkpoint: str, tta: bool, n_views: int, what: str, epoch: int) -> dict:
    m = summarize(pred["label"], pred["probs"])
    m["per_level_recall"] = per_level_recall(pred["label"], pred["probs"].argmax(1), pred["level"])
    m.update(val_loss=pred["loss"], checkpoint=checkpoint, checkpoint_epoch=epoch, tta=tta,
             tta_views=n_views, scored=what)
    return m


def _competition(pred: dict, index: pd.DataFrame, condition: str) -> dict:
    """Competition-metric parts of this condition's predictions (other groups are None)."""
    study = index.set_index("row").loc[pred["row"], "study_id"].to_numpy()
    levels = [LEVELS[i] for i in pred["level"]]
    result = condition_score(study, levels, pred["label"], pred["probs"], condition)
    return rf.nan_to_none(result)


def _write(out: Path, metrics: dict, pred: dict, index: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rf.write_json(out / rf.EVAL_METRICS_FILE, metrics)
    rf.write_predictions(out / rf.PREDICTIONS_FILE, pred, index)
    try:
        from spinegrade.report import plots
    except ImportError:  # figures are optional
        return
    tta = "with TTA" if metrics["tta"] else "no TTA"
    plots.plot_confusion(metrics["confusion_matrix"], out / rf.CONFUSION_PNG,
                         f"{metrics['checkpoint']} checkpoint, {tta}")
    plots.plot_per_level_recall(metrics["per_level_recall"], out / rf.PER_LEVEL_RECALL_PNG)
    log.info("wrote %s", out)
