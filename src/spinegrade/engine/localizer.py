"""Stage 1: find every disc level (which slice, and x/y on it) in a series: training, inference.

One heatmap network per series type (``CONDITION_SERIES``): Sagittal T2/STIR -> 5 spinal
keypoints, Sagittal T1 -> 10 foraminal (left, right x 5 levels), Axial T2 -> 10 subarticular.
The network sees one slice with its neighbours as channels plus a constant plane giving the
slice's position along the patient axis it is cut across (so it can tell the left foramen
from the right one, and L1/L2 from L5/S1 on axial slices). The target is a Gaussian at the
labelled point on the labelled instance and zero on the other slices. At inference every
slice is scored; per keypoint the slice with the highest peak wins and a soft-argmax around
the peak gives (x, y), mapped back to that instance's native pixels.

This module only orchestrates; the pieces live by concept: series preparation, targets and
the dataset in ``data/localizer.py``, the loss in ``losses.py``, heatmap decoding in
``models/localizer_decode.py``, the millimetre and wrong-disc metrics in ``metrics.py``, the
run files in ``engine/run_folder.py`` (``LocalizerFolder``), the learning-rate cosine in
``engine/schedule.py`` and the optimizer step and device choice in ``engine/loop.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spinegrade.config import Config, LocalizerConfig, save_config
from spinegrade.data import rsna
from spinegrade.data.localizer import (
    Augmenter,
    LocalizerDataset,
    LocalizerTask,
    SeriesLabels,
    load_task_series,
    make_task,
    training_samples,
)
from spinegrade.engine.checkpoint import rng_state, save_checkpoint, set_rng_state
from spinegrade.engine.localize import build_localizer, locate_series
from spinegrade.engine.loop import optimizer_step, resolve_device
from spinegrade.engine.run_folder import (
    LOCALIZER,
    LocalizerFolder,
    LocalizerTaskFolder,
    checkpoint_payload,
    read_checkpoint,
)
from spinegrade.engine.schedule import epoch_cosine_lr
from spinegrade.engine.split import holdout_split
from spinegrade.io.atomic import atomic_path
from spinegrade.losses import focal_heatmap_loss
from spinegrade.metrics import ERROR_CLIP_MM, keypoint_errors, selection_score, summarize_errors
from spinegrade.models.localizer import HeatmapLocalizer
from spinegrade.problems import PROBLEMS_FILE, Problem, write_problems

_log = logging.getLogger(__name__)

# Gradient-norm clip of the localizer's steps (its heatmap loss spikes early in training).
GRAD_CLIP = 5.0


# --- labels --------------------------------------------------------------------------------------


def read_coordinates(data_dir: Path, problems: list[Problem]) -> pd.DataFrame:
    """The coordinate rows (``data.rsna.read_coordinates``) with each series' description.

    Returns:
        Columns study_id, series_id, instance_number, condition (column form), level_idx,
        x, y, series_description ("" where the series is not described).
    """
    coords = rsna.read_coordinates(data_dir, problems)
    desc = rsna.read_series_descriptions(data_dir, problems)
    coords["series_description"] = coords["series_id"].map(desc).fillna("")
    return coords[["study_id", "series_id", "instance_number", "condition", "level_idx", "x",
                   "y", "series_description"]].reset_index(drop=True)


# --- training ------------------------------------------------------------------------------------


def train_one_epoch(model: HeatmapLocalizer, loader: Iterable[dict],
                    optimizer: torch.optim.Optimizer, device: torch.device,
                    progress: str | None = None) -> float:
    """One pass over the loader; returns the mean loss per batch.

    Args:
        progress: a progress-bar label (batches within the epoch), or None for no bar.
    """
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=progress, disable=progress is None, leave=False, unit="batch")
    for batch in bar:
        logits = model(batch["image"].to(device))
        loss = focal_heatmap_loss(logits, batch["heatmap"].to(device), batch["mask"].to(device))
        optimizer_step(model, optimizer, loss, GRAD_CLIP, where=" (localizer; lower localizer.lr)")
        total, n = total + float(loss.detach()), n + 1
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


def evaluate(model: HeatmapLocalizer, labelled: Sequence[SeriesLabels], task: LocalizerTask,
             lcfg: LocalizerConfig, device: torch.device) -> pd.DataFrame:
    """Locate every keypoint of the held-out series; errors per labelled keypoint."""
    preds = [locate_series(model, lab.series, lcfg, device, task) for lab in labelled]
    return keypoint_errors(labelled, preds, task)


@dataclass
class _TaskRun:
    task: LocalizerTask
    cfg: Config
    folder: LocalizerTaskFolder
    model: HeatmapLocalizer
    optimizer: torch.optim.Optimizer
    device: torch.device
    history: list[dict]
    best: float = float("inf")
    start_epoch: int = 1
    progress: bool = False
    # Held-out errors of the best epoch trained in this call (None: it was trained before a
    # resume, and only its checkpoint is left).
    best_errors: pd.DataFrame | None = None


def _setup_task(cfg: Config, task: LocalizerTask, folder: LocalizerTaskFolder, resume: bool
                ) -> _TaskRun:
    lcfg = cfg.localizer
    device = resolve_device(lcfg.device, "localizer.device")
    torch.manual_seed(lcfg.seed)
    model = build_localizer(lcfg, task).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lcfg.lr, weight_decay=lcfg.weight_decay)
    run = _TaskRun(task, cfg, folder, model, optimizer, device, [])
    last = folder.checkpoint("last")
    if resume and last.is_file():
        ck = read_checkpoint(last, kind=LOCALIZER, map_location=device)
        model.load_state_dict(ck.model)
        optimizer.load_state_dict(ck.extra["optimizer"])
        set_rng_state(ck.extra["rng"])
        run.history, run.best = list(ck.extra["history"]), float(ck.extra["best"])
        run.start_epoch = ck.epoch + 1
        _log.info("%s: resuming after epoch %d", task.name, ck.epoch)
    return run


def save_localizer_checkpoint(path: Path, cfg: Config, task: LocalizerTask,
                              model: HeatmapLocalizer, epoch: int, **extra: object) -> Path:
    """Write a self-describing localizer checkpoint (config, task, weights) atomically."""
    task_info = {"name": task.name, "series_description": task.series_description,
                 "keypoints": [[c, lv] for c, lv in task.keypoints]}
    return save_checkpoint(path, checkpoint_payload(cfg, epoch, model, kind=LOCALIZER,
                                                    task=task_info, **extra))


def _save(run: _TaskRun, epoch: int, improved: bool) -> None:
    if improved:
        save_localizer_checkpoint(run.folder.checkpoint("best"), run.cfg, run.task, run.model,
                                  epoch, score=run.best)
    save_localizer_checkpoint(run.folder.checkpoint("last"), run.cfg, run.task, run.model, epoch,
                              optimizer=run.optimizer.state_dict(), rng=rng_state(),
                              history=run.history, best=run.best)
    with atomic_path(run.folder.metrics) as tmp:
        pd.DataFrame(run.history).to_csv(tmp, index=False)


def _epoch_loader(lcfg: LocalizerConfig, train: Sequence[SeriesLabels], epoch: int
                  ) -> tuple[torch.utils.data.DataLoader, int]:
    """This epoch's training loader and its number of samples."""
    rng = np.random.default_rng([lcfg.seed, epoch])  # per epoch: resuming needs no state
    samples = training_samples(train, lcfg.neighbour_radius, lcfg.random_negatives, rng)
    if 0 < lcfg.samples_per_epoch < len(samples):
        samples = samples[np.sort(rng.choice(len(samples), lcfg.samples_per_epoch, replace=False))]
    aug = (Augmenter(lcfg.aug_rotate_deg, lcfg.aug_scale, lcfg.aug_shift, rng)
           if lcfg.augment else None)
    dataset = LocalizerDataset(train, samples, n_context=lcfg.n_context_slices,
                               img_size=lcfg.img_size, stride=lcfg.heatmap_stride,
                               sigma=lcfg.heatmap_sigma, augment=aug)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=lcfg.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(lcfg.seed * 1000 + epoch))
    return loader, len(samples)


def _run_epoch(run: _TaskRun, train: Sequence[SeriesLabels], val: Sequence[SeriesLabels],
               epoch: int) -> None:
    """Train one epoch, evaluate on the held-out series, checkpoint and log."""
    lcfg = run.cfg.localizer
    start = time.perf_counter()
    loader, n_samples = _epoch_loader(lcfg, train, epoch)
    lr = epoch_cosine_lr(lcfg.lr, lcfg.min_lr, epoch, lcfg.epochs)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    label = f"{run.task.name} epoch {epoch}/{lcfg.epochs}"
    loss = train_one_epoch(run.model, loader, run.optimizer, run.device,
                           label if run.progress else None)
    # The last epoch is always judged, so a best checkpoint exists whatever val_from_epoch.
    judged = bool(val) and epoch >= min(lcfg.val_from_epoch, lcfg.epochs)
    errors = evaluate(run.model, val, run.task, lcfg, run.device) if judged else pd.DataFrame()
    score = selection_score(errors)
    improved = (judged and score < run.best) or not val
    run.best = min(run.best, score)
    if improved:
        run.best_errors = errors
    overall = summarize_errors(errors).iloc[-1] if not errors.empty else {}
    val_stats = {k: float(overall.get(k, math.nan)) for k in
                 ("median_mm", "p90_mm", "slice_within1", "wrong_disc_rate")}
    # Plain Python numbers only: last.pt must load with weights_only=True.
    run.history.append({"epoch": epoch, "lr": lr, "train_loss": float(loss),
                        "val_score_mm": float(score),
                        **{f"val_{k}": v for k, v in val_stats.items()},
                        "samples": n_samples, "seconds": time.perf_counter() - start})
    _save(run, epoch, improved)
    _log.info("%s: %s", label, epoch_summary(run.history[-1]))


def epoch_summary(row: dict) -> str:
    """One ``metrics.csv`` row as a log line in which every number is named."""
    if not math.isfinite(row["val_score_mm"]):
        return (f"train loss {row['train_loss']:.4f}; held-out: not evaluated this epoch "
                f"(localizer.val_from_epoch); {row['samples']} samples in "
                f"{row['seconds']:.0f} s")
    return (f"train loss {row['train_loss']:.4f}; held-out: median point error "
            f"{row['val_median_mm']:.2f} mm, 90th percentile {row['val_p90_mm']:.2f} mm, "
            f"slice within +-1 {row['val_slice_within1']:.3f}, wrong disc "
            f"{row['val_wrong_disc_rate']:.3f}, selection score (mean 3D error, misses "
            f"clipped at {ERROR_CLIP_MM:.0f} mm) {row['val_score_mm']:.2f} mm; "
            f"{row['samples']} samples in {row['seconds']:.0f} s")


def fit_task(cfg: Config, task: LocalizerTask, train: Sequence[SeriesLabels],
             val: Sequence[SeriesLabels], out: Path, resume: bool = True,
             progress: bool = False) -> pd.DataFrame:
    """Train one task's network; keep the checkpoint with the best held-out score.

    Returns:
        Held-out keypoint errors of the best checkpoint (see ``metrics.keypoint_errors``):
        those its epoch measured, or, when that epoch ran before a resume, measured again.
    """
    run = _setup_task(cfg, task, LocalizerTaskFolder(out), resume)
    run.progress = progress
    for epoch in range(run.start_epoch, cfg.localizer.epochs + 1):
        _run_epoch(run, train, val, epoch)
    if not val:
        return pd.DataFrame()
    if run.best_errors is not None:
        return run.best_errors
    best = read_checkpoint(run.folder.checkpoint("best"), kind=LOCALIZER, map_location=run.device)
    run.model.load_state_dict(best.model)
    return evaluate(run.model, val, task, cfg.localizer, run.device)


def _train_task(cfg: Config, folder: LocalizerFolder, desc: str, data_dir: Path,
                coords: pd.DataFrame, val_ids: set[int], problems: list[Problem],
                progress: bool, resume: bool) -> pd.DataFrame | None:
    """Read, train and evaluate one series type; its held-out summary (None: nothing to do)."""
    from spinegrade.report.localizer import plot_overlay  # matplotlib: only when training

    task, lcfg = make_task(desc), cfg.localizer
    labelled = load_task_series(data_dir, task, coords, lcfg.img_size, lcfg.intensity_percentiles,
                                problems, progress)
    if not labelled:
        _log.warning("%s: no readable labelled series; skipped", task.name)
        return None
    train = [lab for lab in labelled if lab.series.study_id not in val_ids]
    val = [lab for lab in labelled if lab.series.study_id in val_ids]
    _log.info("%s: %d training series, %d held-out", task.name, len(train), len(val))
    tf = folder.task(task.name)
    errors = fit_task(cfg, task, train, val, tf.root, resume, progress)
    if errors.empty:
        return None
    with atomic_path(tf.val_predictions) as tmp:
        errors.to_csv(tmp, index=False)
    plot_overlay(val, errors, task, tf.overlay)
    return summarize_errors(errors).assign(task=task.name)


def train_localizer(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = True,
                    progress: bool = True) -> pd.DataFrame:
    """Train and evaluate one localizer per configured series type.

    Args:
        cfg: the whole config; only ``localizer`` is read.
        data_dir: RSNA-format training data.
        out_dir: run folder (``run_folder.LocalizerFolder``).
        resume: continue from ``last.pt`` where a task has one.
        progress: show progress bars.

    Returns:
        The held-out summary table (task, condition, level, n, median_mm, p90_mm,
        slice_exact, slice_within1, wrong_disc_rate), also written to
        ``localizer_metrics.csv``.
    """
    data_dir, folder = Path(data_dir), LocalizerFolder(Path(out_dir))
    folder.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder.root)
    problems: list[Problem] = []
    coords = read_coordinates(data_dir, problems)
    split = holdout_split(coords["study_id"], cfg.localizer.val_fraction, cfg.localizer.seed)
    with atomic_path(folder.split) as tmp:
        split.to_csv(tmp, index=False)
    val_ids = set(split.loc[split["split"] == "val", "study_id"])
    tables = [t for desc in cfg.localizer.series
              if (t := _train_task(cfg, folder, desc, data_dir, coords, val_ids, problems,
                                   progress, resume)) is not None]
    write_problems(folder.root / PROBLEMS_FILE, problems)
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    table = table[["task", *[c for c in table.columns if c != "task"]]]
    with atomic_path(folder.localizer_metrics) as tmp:
        table.to_csv(tmp, index=False)
    return table
