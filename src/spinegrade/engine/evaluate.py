"""Re-score a run's checkpoint, with or without TTA, on its validation fold or another cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinegrade.config import config_from_dict
from spinegrade.constants import CLASS_NAMES, LEVELS
from spinegrade.engine import checkpoint as ckpt_io
from spinegrade.engine.loop import Settings, _loader, make_run_model, seed_everything
from spinegrade.engine.split import load_split, rows_for_fold
from spinegrade.engine.train import evaluate
from spinegrade.engine.tta import tta_views
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path, atomic_write_text

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


def _rows_to_score(run: Path, cache_arg: str | Path | None, fold: int) -> tuple[Any, np.ndarray, str]:
    """The cache to read and its rows: the run's validation fold, or all of another cache."""
    from spinegrade.data.cache import CropCache, resolve_cache_dir

    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    run_cache = info.get("cache")
    if cache_arg is None:
        if not run_cache:
            raise UserError(f"{run}/run.json does not name the training cache; pass --cache")
        cache_arg = run_cache
    path = resolve_cache_dir(cache_arg)
    cache = CropCache.open(path)
    if run_cache and path.resolve() == Path(run_cache).resolve():
        _, val_rows = rows_for_fold(cache.index, load_split(run), fold)
        return cache, val_rows, f"validation fold {fold}"
    return cache, cache.index["row"].to_numpy(), f"all of {path}"


def evaluate_run(run_dir: str | Path, cache: str | Path | None = None, checkpoint: str = "best",
                 tta: bool = True, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score ``checkpoint`` of a run and write metrics.json, predictions.csv and figures.

    Args:
        run_dir: a training run folder.
        cache: another crop cache to score entirely; default the run's own cache, scored on
            its validation fold (passing the run's own cache also scores that fold).
        checkpoint: best / last / swa.
        tta: average the TTA views of ``eval.tta_brightness`` and ``eval.tta_scales``.
        out_dir: where to write (default ``run_dir/eval``).

    Returns:
        The metrics written to metrics.json.
    """
    run = Path(run_dir)
    ck = ckpt_io.load_checkpoint(ckpt_io.checkpoint_path(run, checkpoint))
    cfg = config_from_dict(ck["config"])
    s = Settings.from_config(cfg, ck.get("fold"))
    seed_everything(cfg.train.seed, s.deterministic)
    data, rows, what = _rows_to_score(run, cache, s.fold)
    model, loss_fn = make_run_model(cfg, data, s, for_inference=True)
    model.load_state_dict(ck["model"])
    from spinegrade.data.dataset import CropDataset
    from spinegrade.engine.distributed import shard

    shard_rows = shard(rows, s.dist)
    loader = _loader(CropDataset(data, shard_rows), cfg.eval.batch_size, cfg, s, shuffle=False)
    views = tta_views(cfg.eval.tta_brightness, cfg.eval.tta_scales) if tta else tta_views()
    pred = evaluate(model, loader, loss_fn, s, views)
    metrics = _metrics(pred, checkpoint, tta, len(views), what, int(ck["epoch"]))
    metrics["competition"] = _competition(pred, data.index, cfg.data.condition)
    metrics["competition_score"] = metrics["competition"]["score"]
    if s.is_main:
        _write(Path(out_dir) if out_dir else run / "eval", metrics, pred, data.index)
    return metrics


def _metrics(pred: dict, checkpoint: str, tta: bool, n_views: int, what: str, epoch: int) -> dict:
    from spinegrade.metrics import summarize

    m = summarize(pred["label"], pred["probs"])
    m["per_level_recall"] = per_level_recall(pred["label"], pred["probs"].argmax(1), pred["level"])
    m.update(val_loss=pred["loss"], checkpoint=checkpoint, checkpoint_epoch=epoch, tta=tta,
             tta_views=n_views, scored=what)
    return m


def _competition(pred: dict, index: pd.DataFrame, condition: str) -> dict:
    """Competition-metric parts of this condition's predictions (other groups are NaN)."""
    from spinegrade.metrics import condition_score

    study = index.set_index("row").loc[pred["row"], "study_id"].to_numpy()
    levels = [LEVELS[i] for i in pred["level"]]
    result = condition_score(study, levels, pred["label"], pred["probs"], condition)
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in result.items()}


def _write(out: Path, metrics: dict, pred: dict, index: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    meta = index.set_index("row").loc[pred["row"]]
    frame = pd.DataFrame({"row": pred["row"], "study_id": meta["study_id"].to_numpy(),
                          "level": [LEVELS[i] for i in pred["level"]], "label": pred["label"]})
    for k, c in enumerate(CLASS_NAMES):
        frame[f"prob_{c}"] = pred["probs"][:, k]
    with atomic_path(out / "predictions.csv", suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    try:
        from spinegrade.report import plots
    except ImportError:  # figures are optional
        return
    tta = "with TTA" if metrics["tta"] else "no TTA"
    plots.plot_confusion(metrics["confusion_matrix"], out / "confusion.png",
                         f"{metrics['checkpoint']} checkpoint, {tta}")
    plots.plot_per_level_recall(metrics["per_level_recall"], out / "per_level_recall.png")
    log.info("wrote %s", out)
