"""Training: ``train_one_epoch``, ``evaluate`` and ``fit`` (the torchvision reference skeleton).

``fit`` owns the run folder. Per epoch it trains, evaluates on the validation fold (all
predictions gathered across processes), updates the health table, the dead-class alarm and
the SWA average, and writes metrics.csv, health.json, TensorBoard events and checkpoints.
After the last epoch it recomputes the SWA model's BatchNorm statistics, evaluates it, and
writes the out-of-fold predictions of the final model. See docs/run_folder.md.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel

from spinegrade.config import Config
from spinegrade.constants import CLASS_NAMES, NUM_CLASSES
from spinegrade.data.augment import BatchAugment, mixup, to_model_input
from spinegrade.data.cache import CropCache
from spinegrade.engine import checkpoint as ckpt_io
from spinegrade.engine import distributed as dist_util
from spinegrade.engine import rerun
from spinegrade.engine import run_folder as rf
from spinegrade.engine.calibrate import calibrate_after_training
from spinegrade.engine.loop import (
    Settings,
    build_loaders,
    make_run_model,
    optimizer_step,
    recompute_bn,
    seed_everything,
)
from spinegrade.engine.monitor import DeadClassMonitor, format_health, health_table
from spinegrade.engine.run_folder import RunFolder
from spinegrade.engine.schedule import PhaseSchedule, apply_lrs, build_optimizer, scale_head_lr
from spinegrade.engine.split import load_split, make_folds, rows_for_fold
from spinegrade.engine.tta import predict_views
from spinegrade.errors import UserError
from spinegrade.metrics import summarize

log = logging.getLogger(__name__)

# Test hook: SIGKILL this process right after epoch N's checkpoints are written.
KILL_ENV = "SPINEGRADE_KILL_AFTER_EPOCH"
# Tests: Ctrl-C (SIGINT to this process) after this epoch's checkpoints, deterministic where a
# signal sent from outside races a tiny run to its end.
INTERRUPT_ENV = "SPINEGRADE_INTERRUPT_AFTER_EPOCH"


def train_one_epoch(model: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, schedule: PhaseSchedule, epoch: int, s: Settings,
                    augment: BatchAugment | None, aug_gen: torch.Generator,
                    head_lr_scale: float = 1.0) -> dict[str, float]:
    """One pass over the training loader.

    ``model`` may be DDP-wrapped. The learning rates are set before every step from the
    schedule (the head's times ``head_lr_scale``: the dead-class boost); augmentation and
    mixup run here on the device, on whole batches.

    Returns:
        ``train_loss`` (sample-weighted mean over all processes), ``n`` and ``seconds``.
    """
    model.train()
    start = time.perf_counter()
    loss_sum, n_seen = 0.0, 0
    for step, batch in enumerate(loader):
        apply_lrs(optimizer, scale_head_lr(schedule.lrs(epoch, step), head_lr_scale))
        x = to_model_input(batch["image"], s.device)
        targets = {"label": batch["label"].to(s.device), "level": batch["level"].to(s.device)}
        if augment is not None:
            x, targets["slice_offset"] = augment(x, aug_gen)
        if s.mixup_alpha > 0:
            x, perm, lam = mixup(x, s.mixup_alpha, aug_gen)
            onehot = F.one_hot(targets["label"], NUM_CLASSES).float()
            targets["label_soft"] = lam * onehot + (1.0 - lam) * onehot[perm]
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
            outputs = model(x, targets["level"])
        loss = loss_fn({k: v.float() for k, v in outputs.items()}, targets)
        optimizer_step(model, optimizer, loss, s.grad_clip, where=f" at epoch {epoch} step {step}")
        loss_sum += loss.item() * len(x)
        n_seen += len(x)
        if s.is_main and s.log_every and (step + 1) % s.log_every == 0:
            log.info("epoch %d step %d/%d loss %.4f", epoch, step + 1, len(loader),
                     loss_sum / n_seen)
    loss_sum, n_seen = dist_util.all_reduce_sum([loss_sum, float(n_seen)], s.device)
    return {"train_loss": loss_sum / max(n_seen, 1), "n": int(n_seen),
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], loss_fn: nn.Module, s: Settings,
             views: list | None = None) -> dict[str, Any]:
    """Predict this process's shard of the validation rows, then gather every process's.

    Args:
        model: the bare model (not DDP-wrapped), put in eval mode here.
        loader: this process's unpadded shard of the evaluation rows.
        loss_fn: the training objective, for the validation loss.
        s: run settings (device, amp).
        views: TTA views (see :mod:`spinegrade.engine.tta`); None = the identity only.

    Returns:
        ``row``, ``label``, ``level`` (N,) and ``probs`` (N, C) over all processes, sorted by
        row and de-duplicated, plus ``loss`` (the sample-weighted mean over batches).
    """
    model.eval()
    parts: dict[str, list[np.ndarray]] = {"row": [], "label": [], "level": [], "probs": []}
    loss_sum, n_seen = 0.0, 0
    for batch in loader:
        x = to_model_input(batch["image"], s.device)
        targets = {"label": batch["label"].to(s.device), "level": batch["level"].to(s.device)}
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
            probs, outputs = predict_views(model, x, targets["level"], views or [lambda v: v])
        loss_sum += loss_fn({k: v.float() for k, v in outputs.items()}, targets).item() * len(x)
        n_seen += len(x)
        parts["probs"].append(probs.float().cpu().numpy())
        for key in ("row", "label", "level"):
            parts[key].append(batch[key].numpy())
    # An empty shard (fewer validation rows than processes) keeps the integer dtypes.
    local = {k: (np.concatenate(v) if v else np.zeros((0, NUM_CLASSES)) if k == "probs"
                 else np.zeros(0, dtype=np.int64)) for k, v in parts.items()}
    pred = dist_util.gather_predictions(local)
    loss_sum, n_seen = dist_util.all_reduce_sum([loss_sum, float(n_seen)], s.device)
    pred["loss"] = loss_sum / max(n_seen, 1)
    return pred


# --- fit ---------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What changes from epoch to epoch and must survive a restart."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_metric: float = -float("inf")
    best_epoch: int = 0
    stopped: bool = False
    # Epoch whose head LR is boosted by the dead-class action (0: none).
    boost_epoch: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "history": self.history, "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "stopped": self.stopped,
                "boost_epoch": self.boost_epoch}


@dataclass
class Trainer:
    """Everything ``fit`` builds once, handed to its per-epoch helpers."""

    cfg: Config
    run: RunFolder
    s: Settings
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    schedule: PhaseSchedule
    loaders: Any
    swa: AveragedModel | None
    monitor: DeadClassMonitor
    augment: BatchAugment | None
    aug_gen: torch.Generator
    state: RunState = field(default_factory=RunState)
    ddp: nn.Module | None = None
    writer: Any = None
    on_epoch_end: Callable[[int, nn.Module], None] | None = None


def fit(cfg: Config, cache: Any, out_dir: str | Path, fold: int | None = None,
        resume: bool = False, on_epoch_end: Callable[[int, nn.Module], None] | None = None,
        restart: bool = False) -> dict[str, Any]:
    """Train one fold of ``cache`` as ``cfg`` says, writing the run folder ``out_dir``.

    Args:
        cfg: the resolved config (read here and nowhere below the engine).
        cache: a crop cache folder (or an opened ``CropCache``).
        out_dir: run folder; created if missing.
        fold: validation fold (default ``cfg.data.fold``).
        resume: insist on continuing the run in ``out_dir`` (from ``checkpoints/last.pt``;
            from epoch 1 when it has none). Without it, an unfinished run of the same config
            and cache is resumed too, and any other run refused (``engine.rerun``).
        on_epoch_end: optional callback ``(epoch, bare_model)`` after each epoch (tests).
        restart: replace the run in ``out_dir``: all its outputs are removed first.

    Returns:
        The summary written to ``final.json`` (best epoch and metric, SWA metrics, ...).
    """
    fold = cfg.data.fold if fold is None else fold
    run = RunFolder(out_dir)
    if resume:
        _check_resume_fold(run, fold)
    t = _setup(cfg, cache, run, fold, resume, restart)
    t.on_epoch_end = on_epoch_end
    try:
        for epoch in range(t.state.epoch + 1, cfg.train.epochs + 1):
            if t.state.stopped:
                break
            _run_epoch(t, epoch)
        summary = _finish(t)
    finally:
        if t.writer is not None:
            t.writer.close()
        dist_util.barrier()
    return summary


def _check_resume_fold(run: RunFolder, fold: int) -> None:
    """Refuse to resume a run on another fold: its validation studies would leak into training."""
    if not run.checkpoint("last").is_file():
        return
    trained = run.read_info().get("fold")
    if trained is not None and int(trained) != fold:
        raise UserError(f"{run.root} was trained on fold {trained}; resume it with --fold {trained} "
                        f"(or train fold {fold} into another folder)")


# Metrics train.select_metric may name, and whether a larger value is better.
SELECT_METRICS: dict[str, bool] = {"balanced_accuracy": True, "weighted_logloss": False,
                                   "val_loss": False}


def _improves(value: float | None, state: RunState, metric: str) -> bool:
    """Whether this epoch's ``metric`` beats the best so far (NaN and None never do)."""
    if value is None or value != value:
        return False
    if state.best_epoch == 0:
        return True
    return value > state.best_metric if SELECT_METRICS[metric] else value < state.best_metric


def _setup(cfg: Config, cache: Any, run: RunFolder, fold: int, resume: bool,
           restart: bool = False) -> Trainer:
    """Process group, data, model, optimizer, schedule, SWA, and the resumed state.

    Nothing is written into the run folder before everything is built: a run that fails
    here (bad cache, too few samples) leaves the folder as it was.
    """
    s = Settings.from_config(cfg, fold)
    if not s.is_main:  # one voice: the other processes only report errors
        logging.getLogger("spinegrade").setLevel(logging.ERROR)
    seed_everything(cfg.train.seed, s.deterministic)
    cache = CropCache.open(cache) if isinstance(cache, str | Path) else cache
    resume = rerun.decide(run, cfg, cache, resume=resume, restart=restart)
    split = _load_or_make_split(cfg, cache, run, resume)
    train_rows, val_rows = rows_for_fold(cache.index, split, fold)
    loaders = build_loaders(cfg, cache, train_rows, val_rows, s)
    counts = np.bincount(cache.index.set_index("row").loc[train_rows, "label"], minlength=NUM_CLASSES)
    model, loss_fn = make_run_model(cfg, cache, s, class_counts=counts.tolist())
    schedule = PhaseSchedule.from_config(cfg.train, len(loaders.train))
    t = Trainer(cfg=cfg, run=run, s=s, model=model, optimizer=build_optimizer(model, cfg.train),
                loss_fn=loss_fn, schedule=schedule, loaders=loaders,
                swa=AveragedModel(model) if cfg.train.swa else None,
                monitor=DeadClassMonitor(cfg.train.dead_class_patience, cfg.train.dead_class_action),
                augment=_make_augment(cfg) if cfg.train.augment else None,
                aug_gen=torch.Generator().manual_seed(cfg.train.seed * 1000 + 17 + s.rank))
    if s.is_main:
        info = rf.run_info(cache, fold, s.world_size, str(s.device), len(train_rows),
                           len(val_rows), torch.__version__)
        weights = getattr(model, "backbone_weights", None)
        info["backbone_weights"] = weights.as_dict() if weights is not None else None
        rerun.start_outputs(run, cfg, split, restart, info)
    dist_util.barrier()
    last = run.checkpoint("last")
    if resume and last.is_file():
        _restore(t, rf.read_checkpoint(last, map_location=s.device))
        log.info("resumed from %s after epoch %d", last, t.state.epoch)
    elif resume and s.is_main:
        log.info("no %s yet: starting from epoch 1", last)
    t.writer = rf.tensorboard_writer(run, t.state.epoch + 1) if s.is_main else None
    return t


def _make_augment(cfg: Config) -> BatchAugment:
    tc = cfg.train
    return BatchAugment(rotate_deg=tc.aug_rotate_deg, shift=tc.aug_shift, scale=tc.aug_scale,
                        brightness=tc.aug_brightness, gamma=tc.aug_gamma,
                        slice_jitter=tc.slice_jitter)


def _load_or_make_split(cfg: Config, cache: Any, run: RunFolder, resume: bool) -> pd.DataFrame:
    """The run's saved split when resuming, else a fresh one (saved by rerun.start_outputs)."""
    if run.split.is_file() and resume:
        return load_split(run.root)
    # Every process computes the same split from the same seed (data.split_seed: the folds
    # stay put when only train.seed changes).
    return make_folds(cache.index, cfg.data.folds, cfg.data.split_seed)


def _run_epoch(t: Trainer, epoch: int) -> None:
    """Train, evaluate, monitor, average, checkpoint and log one epoch."""
    trainable = t.schedule.backbone_trainable(epoch)
    if t.ddp is None or t.model.backbone_trainable != trainable:
        t.model.set_backbone_trainable(trainable)
        # DDP registers only parameters that require grad, so re-wrap when that set changes.
        t.ddp = _wrap_ddp(t.model, t.s)
    boost = t.cfg.train.dead_class_lr_boost if t.state.boost_epoch == epoch else 1.0
    lrs = scale_head_lr(t.schedule.lrs(epoch, 0), boost)
    stats = train_one_epoch(t.ddp, t.loaders.train, t.optimizer, t.loss_fn, t.schedule, epoch,
                            t.s, t.augment, t.aug_gen, head_lr_scale=boost)
    dist_util.broadcast_buffers(t.model)
    pred = evaluate(t.model, t.loaders.val, t.loss_fn, t.s)
    row = _epoch_row(t, epoch, lrs, stats, pred)
    dead, action = t.monitor.update({c: row[f"pred_count_{c}"] for c in CLASS_NAMES}, epoch)
    row["dead_classes"] = json.dumps(dead)
    if action is not None:
        row["dead_class_action"] = action
        _apply_dead_class_action(t, action, epoch)
    t.state.history.append(row)
    t.state.epoch = epoch
    if t.swa is not None and t.schedule.in_swa(epoch):
        t.swa.update_parameters(t.model)
    improved = _improves(row.get(t.cfg.train.select_metric), t.state, t.cfg.train.select_metric)
    if improved:
        t.state.best_metric, t.state.best_epoch = row[t.cfg.train.select_metric], epoch
    _save_epoch(t, epoch, improved)
    if t.on_epoch_end is not None:
        t.on_epoch_end(epoch, t.model)
    if os.environ.get(KILL_ENV) == str(epoch):
        dist_util.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(INTERRUPT_ENV) == str(epoch):
        os.kill(os.getpid(), signal.SIGINT)


def _wrap_ddp(model: nn.Module, s: Settings) -> nn.Module:
    if s.world_size <= 1:
        return model
    ids = [s.device.index] if s.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _apply_dead_class_action(t: Trainer, action: str, epoch: int) -> None:
    if action in ("reset_bias", "reset_bias_boost"):
        log.warning("epoch %d: resetting the head bias to the prior", epoch)
        t.model.reset_head_bias()
    if action == "reset_bias_boost":
        t.state.boost_epoch = epoch + 1  # why: docs/models.md, "Dead-class action"
        log.warning("epoch %d: head learning rate x%g for epoch %d", epoch,
                    t.cfg.train.dead_class_lr_boost, epoch + 1)
    elif action == "stop":
        log.warning("epoch %d: stopping training (train.dead_class_action=stop)", epoch)
        t.state.stopped = True


def _epoch_row(t: Trainer, epoch: int, lrs: dict[str, float], stats: dict, pred: dict) -> dict:
    """One metrics.csv row: losses, learning rates and the validation summary."""
    m = summarize(pred["label"], pred["probs"])
    row: dict[str, Any] = {"epoch": epoch, "phase": t.schedule.phase(epoch),
                           "lr_backbone": lrs["backbone"], "lr_head": lrs["head"],
                           "train_loss": stats["train_loss"], "val_loss": pred["loss"],
                           "balanced_accuracy": m["balanced_accuracy"]}
    row.update({f"recall_{c}": m["recall"][c] for c in CLASS_NAMES})
    row.update({f"pred_count_{c}": m["prediction_counts"][c] for c in CLASS_NAMES})
    row["weighted_logloss"] = m["weighted_logloss"]
    row["n_val"] = m["n_samples"]
    row["confusion_matrix"] = json.dumps(m["confusion_matrix"])
    w = t.model.slice_weights()
    row["slice_weights"] = json.dumps([round(float(v), 5) for v in w]) if w is not None else ""
    row["seconds"] = round(stats["seconds"], 2)
    return row


def _save_epoch(t: Trainer, epoch: int, improved: bool) -> None:
    """Checkpoints (last, and best when improved), metrics.csv, health.json, TensorBoard, log."""
    # RNG states of every process, so a resumed multi-process run continues each stream.
    rng = dist_util.all_gather_objects(ckpt_io.rng_state(t.loaders.generator))
    aug = dist_util.all_gather_objects(t.aug_gen.get_state())
    if not t.s.is_main:
        return
    if improved:
        ckpt_io.save_checkpoint(t.run.checkpoint("best"), rf.checkpoint_payload(
            t.cfg, epoch, t.model, fold=t.s.fold, metrics=rf.nan_to_none(t.state.history[-1])))
    ckpt_io.save_checkpoint(t.run.checkpoint("last"), rf.checkpoint_payload(
        t.cfg, epoch, t.model, fold=t.s.fold, optimizer=t.optimizer.state_dict(),
        schedule=t.schedule.state_dict(), swa=t.swa.state_dict() if t.swa else None,
        rng=rng, augment_rng=aug, monitor=t.monitor.state_dict(),
        state=t.state.state_dict(), world_size=t.s.world_size))
    rf.write_history(t.run, t.state.history, t.state.epoch,
                     health_table(t.state.history, t.cfg.eval))
    _log_epoch(t, epoch)


def _log_epoch(t: Trainer, epoch: int) -> None:
    """The compact per-epoch line, the confusion matrix, the health table and TensorBoard."""
    r = t.state.history[-1]
    rec = " ".join(f"{c[:3]}={_fmt(r[f'recall_{c}'])}" for c in CLASS_NAMES)
    cnt = "/".join(str(r[f"pred_count_{c}"]) for c in CLASS_NAMES)
    print(f"epoch {epoch:3d}/{t.cfg.train.epochs} [{r['phase']:<8}] lr {r['lr_backbone']:.1e}/"
          f"{r['lr_head']:.1e} train {r['train_loss']:.4f} val {r['val_loss']:.4f} "
          f"BA {_fmt(r['balanced_accuracy'])} recall {rec} preds {cnt} "
          f"wlogloss {_fmt(r['weighted_logloss'])} {r['seconds']:.0f}s", flush=True)
    cm = json.loads(r["confusion_matrix"])
    print("  confusion (rows true N/M/S, cols predicted): "
          + " | ".join(" ".join(f"{v:4d}" for v in line) for line in cm), flush=True)
    dead = json.loads(r["dead_classes"])
    if dead:
        print(f"  WARNING: dead class(es) {', '.join(dead)}: no predictions this epoch", flush=True)
    print("  health (plan's metrics to watch):\n"
          + format_health(health_table(t.state.history, t.cfg.eval)), flush=True)
    if t.writer is not None:
        for key in ("train_loss", "val_loss", "balanced_accuracy", "weighted_logloss",
                    "lr_backbone", "lr_head", *(f"recall_{c}" for c in CLASS_NAMES),
                    *(f"pred_count_{c}" for c in CLASS_NAMES)):
            if r.get(key) is not None:
                t.writer.add_scalar(key, r[key], epoch)
        t.writer.flush()


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def _restore(t: Trainer, last: rf.RunCheckpoint) -> None:
    """Load a last.pt into the trainer: weights, optimizer, SWA, monitor, history, RNG."""
    if rerun.config_differences(last.config, t.cfg):
        log.warning("resuming with a config that differs from the checkpoint's")
    t.model.load_state_dict(last.model)
    ck = last.extra
    t.optimizer.load_state_dict(ck["optimizer"])
    if t.swa is not None and ck.get("swa") is not None:
        t.swa.load_state_dict(ck["swa"])
    t.monitor.load_state_dict(ck["monitor"])
    st = ck["state"]
    t.state = RunState(epoch=st["epoch"], history=list(st["history"]),
                       best_metric=st["best_metric"], best_epoch=st["best_epoch"],
                       stopped=st["stopped"], boost_epoch=st.get("boost_epoch", 0))
    if ck["schedule"]["steps_per_epoch"] != t.schedule.steps_per_epoch:
        log.warning("steps per epoch changed (%d -> %d): the cosine resumes on the new grid",
                    ck["schedule"]["steps_per_epoch"], t.schedule.steps_per_epoch)
    if len(ck["rng"]) == t.s.world_size:
        ckpt_io.set_rng_state(ck["rng"][t.s.rank], t.loaders.generator)
        t.aug_gen.set_state(ck["augment_rng"][t.s.rank])
    else:
        log.warning("resuming with %d processes instead of %d: RNG streams restart",
                    t.s.world_size, len(ck["rng"]))


def _finish(t: Trainer) -> dict[str, Any]:
    """SWA (BN recomputed, evaluated, saved), out-of-fold predictions, final.json, report."""
    summary: dict[str, Any] = {"best_epoch": t.state.best_epoch, "best_metric": t.state.best_metric,
                               "select_metric": t.cfg.train.select_metric,
                               "epochs_run": t.state.epoch, "stopped_early": t.state.stopped}
    if t.swa is not None and int(t.swa.n_averaged) > 0:
        swa_model = t.swa.module
        recompute_bn(swa_model, t.loaders.bn, t.s)
        pred = evaluate(swa_model, t.loaders.val, t.loss_fn, t.s)
        summary["swa"] = {**summarize(pred["label"], pred["probs"]), "val_loss": pred["loss"],
                          "n_averaged": int(t.swa.n_averaged)}
        if t.s.is_main:
            ckpt_io.save_checkpoint(t.run.checkpoint("swa"), rf.checkpoint_payload(
                t.cfg, t.state.epoch, swa_model, fold=t.s.fold, n_averaged=int(t.swa.n_averaged)))
        summary["final_checkpoint"] = "swa"
    else:
        name = "best" if t.state.best_epoch else "last"
        pred = evaluate(_load_weights(t, name), t.loaders.val, t.loss_fn, t.s)
        summary["final_checkpoint"] = name
    if t.s.is_main:
        rf.write_predictions(t.run.oof, pred, t.loaders.index)
        rc = calibrate_after_training(t.cfg, t.run, t.loaders.index, summary["final_checkpoint"])
        if rc is not None:
            summary["calibration"] = rc.calibration.to_dict()
        rf.write_json(t.run.final, summary)
        _print_summary(summary)
        rf.write_report(t.run)
    return summary


def _load_weights(t: Trainer, name: str) -> nn.Module:
    """A copy of the run model carrying the weights of checkpoint ``name``."""
    model = copy.deepcopy(t.model)
    dist_util.barrier()  # best.pt is written by the main process
    model.load_state_dict(rf.read_checkpoint(t.run.checkpoint(name), map_location=t.s.device).model)
    return model


def _print_summary(summary: dict) -> None:
    print(f"best epoch {summary['best_epoch']} by validation {summary['select_metric']} "
          f"(no TTA): {summary['best_metric']:.4f}", flush=True)
    if "swa" in summary:
        sw = summary["swa"]
        print(f"SWA model over {sw['n_averaged']} epochs, validation, no TTA: BA "
              f"{_fmt(sw['balanced_accuracy'])} weighted logloss {_fmt(sw['weighted_logloss'])} "
              f"confusion {sw['confusion_matrix']}", flush=True)
    print(f"final model: the {summary['final_checkpoint']} checkpoint (oof.csv; evaluate and "
          "predict use it by default)", flush=True)


__all__ = ["fit", "train_one_epoch", "evaluate", "KILL_ENV", "INTERRUPT_ENV", "UserError"]
