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

from spinegrade.config import Config, LocalizerConfig, config_from_dict, save_config
from spinegrade.constants import LEVELS, SERIES_DESCRIPTIONS, is_sagittal
from spinegrade.data import rsna
from spinegrade.data.localizer import (
    Augmenter,
    LocalizerDataset,
    LocalizerTask,
    PreparedSeries,
    SeriesLabels,
    load_task_series,
    make_task,
    prepare_series,
    slice_input,
    training_samples,
)
from spinegrade.engine.checkpoint import rng_state, save_checkpoint, set_rng_state
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
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path
from spinegrade.io.dicom import Volume
from spinegrade.losses import focal_heatmap_loss
from spinegrade.metrics import keypoint_errors, selection_score, summarize_errors
from spinegrade.models.localizer import HeatmapLocalizer
from spinegrade.models.localizer_decode import (
    Located,
    cell_to_grid,
    ordered_level_cells,
    soft_argmax,
)
from spinegrade.problems import PROBLEMS_FILE, Problem, write_problems

_log = logging.getLogger(__name__)

# Gradient-norm clip of the localizer's steps (its heatmap loss spikes early in training).
GRAD_CLIP = 5.0
# The columns of locate_study's table (one row per located keypoint).
LOCATED_COLUMNS = ("study_id", "series_id", "series_description", "condition", "level_idx",
                   "level", "slice_index", "instance_number", "x", "y", "score")


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


# --- model ---------------------------------------------------------------------------------------


def build_localizer(lcfg: LocalizerConfig, task: LocalizerTask, for_inference: bool = False
                    ) -> HeatmapLocalizer:
    """The heatmap network of one task, as ``localizer`` config describes it."""
    return HeatmapLocalizer(
        lcfg.backbone, in_chans=lcfg.n_context_slices + 1, num_keypoints=len(task.keypoints),
        heatmap_stride=lcfg.heatmap_stride, max_stride=lcfg.max_stride,
        decoder_channels=lcfg.decoder_channels,
        pretrained=lcfg.pretrained and not for_inference,
        pretrained_path="" if for_inference else lcfg.pretrained_path)


# --- inference -----------------------------------------------------------------------------------


@torch.no_grad()
def heatmaps(model: HeatmapLocalizer, series: PreparedSeries, n_context: int,
             device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Sigmoid heatmaps of every slice, (n, K, h, w) float32 on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(series), batch_size):
        x = np.stack([slice_input(series, j, n_context)
                      for j in range(start, min(start + batch_size, len(series)))])
        out.append(torch.sigmoid(model(torch.from_numpy(x).to(device)).float()).cpu())
    return torch.cat(out)


def locate_series(model: HeatmapLocalizer, series: PreparedSeries, lcfg: LocalizerConfig,
                  device: torch.device, task: LocalizerTask | None = None) -> list[Located]:
    """Per keypoint channel: the slice with the highest peak and the refined (x, y) on it.

    With ``lcfg.ordered_levels`` and a sagittal ``task``, each condition's levels are first
    assigned to consecutive discs (:func:`ordered_level_cells`); (x, y) is then refined
    around the assigned disc on the channel's best slice.
    """
    hm = heatmaps(model, series, lcfg.n_context_slices, device).numpy()
    stride, r = lcfg.heatmap_stride, lcfg.refine_radius
    cells: dict[int, tuple[int, int]] = {}
    if lcfg.ordered_levels and task is not None and is_sagittal(task.series_description):
        for cond in dict.fromkeys(c for c, _ in task.keypoints):
            chans = [k for k, (c, _) in enumerate(task.keypoints) if c == cond]
            cells.update(ordered_level_cells(hm, chans, series, stride) or {})
    out = []
    for k in range(hm.shape[1]):
        # The slice is where the channel peaks: even a channel that confuses neighbouring
        # discs peaks on the right slice (the mid-sagittal one, or its side's foramina).
        j = int(np.argmax(hm[:, k].reshape(len(series), -1).max(axis=1)))
        hx, hy, peak = soft_argmax(hm[j, k], r, at=cells.get(k))
        x, y = series.to_native(j, cell_to_grid(hx, stride), cell_to_grid(hy, stride))
        out.append(Located(j, int(series.instance_numbers[j]), x, y, peak))
    return out


def locate_study(models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]],
                 series: Iterable[tuple[str, PreparedSeries]], lcfg: LocalizerConfig,
                 device: torch.device) -> pd.DataFrame:
    """Locate every keypoint of every task in one study's series.

    Where a study has several series of one type (e.g. two Axial T2), each keypoint is taken
    from the series where its peak is highest.

    Args:
        models: task name -> (task, network).
        series: (series description, prepared series) of one study.
        lcfg: localizer config.
        device: where the networks run.

    Returns:
        One row per keypoint found, ``LOCATED_COLUMNS``.
    """
    best: dict[tuple[str, int], dict] = {}
    by_desc = {t.series_description: (t, m) for t, m in models.values()}
    for desc, prep in series:
        if desc not in by_desc:
            continue
        task, model = by_desc[desc]
        for (cond, lvl), loc in zip(task.keypoints, locate_series(model, prep, lcfg, device, task),
                                    strict=True):
            if (cond, lvl) not in best or loc.score > best[(cond, lvl)]["score"]:
                best[(cond, lvl)] = {
                    "study_id": prep.study_id, "series_id": prep.series_id,
                    "series_description": desc, "condition": cond, "level_idx": lvl,
                    "level": LEVELS[lvl], "slice_index": loc.slice_index,
                    "instance_number": loc.instance_number, "x": loc.x, "y": loc.y,
                    "score": loc.score}
    return pd.DataFrame(list(best.values()), columns=list(LOCATED_COLUMNS))


# --- training ------------------------------------------------------------------------------------


def train_one_epoch(model: HeatmapLocalizer, loader: Iterable[dict],
                    optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """One pass over the loader; returns the mean loss per batch."""
    model.train()
    total, n = 0.0, 0
    for batch in loader:
        logits = model(batch["image"].to(device))
        loss = focal_heatmap_loss(logits, batch["heatmap"].to(device), batch["mask"].to(device))
        optimizer_step(model, optimizer, loss, GRAD_CLIP, where=" (localizer; lower localizer.lr)")
        total, n = total + float(loss.detach()), n + 1
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
    loss = train_one_epoch(run.model, loader, run.optimizer, run.device)
    errors = evaluate(run.model, val, run.task, lcfg, run.device) if val else pd.DataFrame()
    score = selection_score(errors)
    improved = score < run.best or not val
    run.best = min(run.best, score)
    overall = summarize_errors(errors).iloc[-1] if not errors.empty else {}
    # Plain Python numbers only: last.pt must load with weights_only=True.
    run.history.append({"epoch": epoch, "lr": lr, "train_loss": float(loss),
                        "val_score_mm": float(score),
                        "val_median_mm": float(overall.get("median_mm", math.nan)),
                        "val_slice_within1": float(overall.get("slice_within1", math.nan)),
                        "samples": n_samples, "seconds": time.perf_counter() - start})
    _save(run, epoch, improved)
    _log.info("%s epoch %d/%d: loss %.4f, held-out 3D error %.2f mm, median %.2f mm, "
              "+-1 slice %.3f (%.0f s)", run.task.name, epoch, lcfg.epochs, loss, score,
              overall.get("median_mm", float("nan")),
              overall.get("slice_within1", float("nan")), time.perf_counter() - start)


def fit_task(cfg: Config, task: LocalizerTask, train: Sequence[SeriesLabels],
             val: Sequence[SeriesLabels], out: Path, resume: bool = True) -> pd.DataFrame:
    """Train one task's network; keep the checkpoint with the best held-out score.

    Returns:
        Held-out keypoint errors of the best checkpoint (see ``metrics.keypoint_errors``).
    """
    run = _setup_task(cfg, task, LocalizerTaskFolder(out), resume)
    for epoch in range(run.start_epoch, cfg.localizer.epochs + 1):
        _run_epoch(run, train, val, epoch)
    best = read_checkpoint(run.folder.checkpoint("best"), kind=LOCALIZER, map_location=run.device)
    run.model.load_state_dict(best.model)
    return evaluate(run.model, val, task, cfg.localizer, run.device) if val else pd.DataFrame()


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
    errors = fit_task(cfg, task, train, val, tf.root, resume)
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


# --- loading a trained localizer -----------------------------------------------------------------


@dataclass
class LocalizerRun:
    """A trained localizer run folder, ready to locate levels in new studies."""

    path: Path
    lcfg: LocalizerConfig
    models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]]
    device: torch.device

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto") -> LocalizerRun:
        """Load ``best.pt`` (else ``last.pt``) of every task in ``run_dir``.

        Raises:
            UserError: the folder holds no localizer checkpoint.
        """
        folder = LocalizerFolder(Path(run_dir))
        dev = resolve_device(device, "predict.device")
        models: dict[str, tuple[LocalizerTask, HeatmapLocalizer]] = {}
        lcfg = None
        for desc in SERIES_DESCRIPTIONS:
            task = make_task(desc)
            ckpts = [folder.task(task.name).checkpoint(n) for n in ("best", "last")]
            path = next((p for p in ckpts if p.is_file()), None)
            if path is None:
                continue
            ck = read_checkpoint(path, kind=LOCALIZER, map_location=dev)
            lcfg = config_from_dict(ck.config).localizer
            task = LocalizerTask(task.name, desc, tuple((c, int(lv)) for c, lv in
                                                        ck.extra["task"]["keypoints"]))
            model = build_localizer(lcfg, task, for_inference=True).to(dev)
            model.load_state_dict(ck.model)
            models[task.name] = (task, model.eval())
        if lcfg is None:
            raise UserError(f"{folder.root}: no localizer checkpoint in any task folder; "
                            "train one with 'spinegrade train-localizer'")
        return cls(folder.root, lcfg, models, dev)

    @property
    def series_descriptions(self) -> tuple[str, ...]:
        """The series types this run can localise."""
        return tuple(t.series_description for t, _ in self.models.values())

    def prepare(self, volume: Volume, study_id: int, series_id: int) -> PreparedSeries:
        """A Volume normalised and resized as this run's networks expect."""
        return prepare_series(volume, study_id, series_id, self.lcfg.img_size,
                              self.lcfg.intensity_percentiles)

    def locate(self, series: Iterable[tuple[str, PreparedSeries]]) -> pd.DataFrame:
        """See :func:`locate_study`."""
        return locate_study(self.models, series, self.lcfg, self.device)
