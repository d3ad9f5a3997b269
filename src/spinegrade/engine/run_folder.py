"""The run folder, one concept with one home: its file names, checkpoint payload and writers.

Every command that writes or reads a training run (train, evaluate, ablate, predict, the
report) takes its paths from :class:`RunFolder`, builds and reads checkpoints with
:func:`checkpoint_payload` / :func:`read_checkpoint`, and writes JSON and prediction tables
with :func:`write_json` / :func:`write_predictions`. The files are described in
docs/run_folder.md.

This module does not import torch at start-up (the CLI reads :data:`CHECKPOINT_NAMES` while
it builds its parser); only reading a checkpoint does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from spinegrade.choices import CHECKPOINT_NAMES
from spinegrade.config import CONFIG_FILE, Config, config_from_dict, config_to_dict
from spinegrade.constants import CLASS_PROB_COLUMNS, LEVELS
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# --- file names ------------------------------------------------------------------------------

RUN_INFO_FILE = "run.json"
SPLIT_FILE = "split.csv"
METRICS_FILE = "metrics.csv"
HEALTH_FILE = "health.json"
FINAL_FILE = "final.json"
OOF_FILE = "oof.csv"
# Temperature / bias / prior mix fitted on oof.csv after training (engine.calibrate).
CALIBRATION_FILE = "calibration.json"
REPORT_FILE = "report.html"
TENSORBOARD_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
PLOTS_DIR = "plots"
# `spinegrade evaluate` writes into RUN/eval (or --out): these names, whichever the folder.
EVAL_DIR = "eval"
EVAL_METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_PNG = "confusion.png"
PER_LEVEL_RECALL_PNG = "per_level_recall.png"
# The report's figures in RUN/plots (per_level_recall.png as in eval).
LOSS_PNG = "loss.png"
RECALL_PNG = "recall.png"
CONFUSION_BEST_PNG = "confusion_best.png"
CONFUSION_EVAL_PNG = "confusion_eval.png"
SLICE_WEIGHTS_PNG = "slice_weights.png"
# A localizer run: RUN/config.yaml, split.csv, localizer_metrics.csv, problems.csv and one
# RUN/<task>/ per series type with checkpoints/{best,last}.pt, metrics.csv and these two.
LOCALIZER_METRICS_FILE = "localizer_metrics.csv"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
OVERLAY_PNG = "overlay.png"
RELIABILITY_PNG = "reliability.png"


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder and the path of each file in it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO_FILE

    @property
    def split(self) -> Path:
        return self.root / SPLIT_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def health(self) -> Path:
        return self.root / HEALTH_FILE

    @property
    def final(self) -> Path:
        return self.root / FINAL_FILE

    @property
    def oof(self) -> Path:
        return self.root / OOF_FILE

    @property
    def calibration(self) -> Path:
        return self.root / CALIBRATION_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def plots(self) -> Path:
        return self.root / PLOTS_DIR

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>.pt`` for name in best / last / swa."""
        if name not in CHECKPOINT_NAMES:
            raise UserError(f"unknown checkpoint '{name}'; choose one of {', '.join(CHECKPOINT_NAMES)}")
        return self.root / CHECKPOINT_DIR / f"{name}.pt"

    def read_info(self) -> dict[str, Any]:
        """``run.json`` (cache path, fold, ...), or ``{}`` when the run has none."""
        return json.loads(self.run_info.read_text()) if self.run_info.is_file() else {}

    def final_checkpoint(self) -> str:
        """The checkpoint ``final.json`` names as the final model (SWA when it ran), else best."""
        if self.final.is_file():
            name = json.loads(self.final.read_text()).get("final_checkpoint")
            if name in CHECKPOINT_NAMES:
                return name
        return "best"


@dataclass(frozen=True)
class LocalizerFolder(RunFolder):
    """A ``train-localizer`` run: config, split and problems at the root, one task per folder."""

    @property
    def localizer_metrics(self) -> Path:
        return self.root / LOCALIZER_METRICS_FILE

    def task(self, name: str) -> LocalizerTaskFolder:
        """The folder of one series type's network (``RUN/<task>``)."""
        return LocalizerTaskFolder(self.root / name)


@dataclass(frozen=True)
class LocalizerTaskFolder(RunFolder):
    """One localizer task: ``checkpoints/``, ``metrics.csv`` and the held-out predictions."""

    @property
    def val_predictions(self) -> Path:
        return self.root / VAL_PREDICTIONS_FILE

    @property
    def overlay(self) -> Path:
        return self.root / OVERLAY_PNG


# --- writers ---------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (numpy scalars and arrays as plain values)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def nan_to_none(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with NaN floats as None: JSON has no NaN, and None is weights_only-safe."""
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}


def run_info(cache: Any, fold: int, world_size: int, device: str, n_train: int, n_val: int,
             torch_version: str) -> dict[str, Any]:
    """What ``run.json`` records: the cache (absolute path and fingerprint, to notice a cache
    that changed under the run), fold, processes, sample counts."""
    return {"cache": str(Path(cache.path).resolve()) if hasattr(cache, "path") else None,
            "cache_fingerprint": getattr(cache, "fingerprint", None),
            "fold": fold, "world_size": world_size, "device": device,
            "n_train": n_train, "n_val": n_val, "torch": torch_version}


def write_history(folder: RunFolder, history: list[dict], epoch: int, health: list[dict]) -> None:
    """``metrics.csv`` (one row per epoch so far) and ``health.json`` (the table after ``epoch``)."""
    with atomic_path(folder.metrics, suffix=".csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    write_json(folder.health, {"epoch": epoch, "items": health})


def predictions_frame(pred: dict[str, np.ndarray], index: pd.DataFrame) -> pd.DataFrame:
    """One row per scored sample: ``row, study_id, level, label, prob_<class>``.

    Args:
        pred: ``row``, ``level``, ``label`` (N,) and ``probs`` (N, C), as ``evaluate`` returns.
        index: the crop cache's index (maps ``row`` to its study).
    """
    meta = index.set_index("row").loc[pred["row"]]
    frame = pd.DataFrame({"row": pred["row"], "study_id": meta["study_id"].to_numpy(),
                          "level": [LEVELS[i] for i in pred["level"]], "label": pred["label"]})
    for k, col in enumerate(CLASS_PROB_COLUMNS):
        frame[col] = pred["probs"][:, k]
    return frame


def write_predictions(path: Path, pred: dict[str, np.ndarray], index: pd.DataFrame) -> None:
    """:func:`predictions_frame` as a CSV (oof.csv, eval/predictions.csv), atomically."""
    with atomic_path(path, suffix=".csv") as tmp:
        predictions_frame(pred, index).to_csv(tmp, index=False)


def tensorboard_writer(folder: RunFolder, first_epoch: int) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``tb/``, or None without TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    # purge_step drops events a killed run logged after its last checkpoint.
    return SummaryWriter(str(folder.tensorboard), purge_step=first_epoch if first_epoch > 1 else None)


def write_report(folder: RunFolder) -> None:
    """Build ``report.html``; a missing report module or a plotting error only logs."""
    try:
        from spinegrade.report import build_report
    except ImportError:  # the report module is optional (and imports this one)
        return
    try:
        path = build_report(folder.root)
        print(f"report: {path}", flush=True)
    except Exception as e:  # a plotting problem must not lose a finished run
        log.warning("could not build the report: %s", e)


# --- checkpoint payload ----------------------------------------------------------------------

CLASSIFIER = "classifier"
LOCALIZER = "localizer"
# The keys every payload has; the rest is what its kind and file add (see docs/run_folder.md).
_CORE_KEYS = ("format_version", "class_names", "config", "epoch", "fold", "kind", "model")


def checkpoint_payload(cfg: Config, epoch: int, model: nn.Module, *, kind: str = CLASSIFIER,
                       fold: int | None = None, **extra: Any) -> dict[str, Any]:
    """What a checkpoint holds: the resolved config, the epoch and the weights, plus ``extra``.

    A classifier payload records its validation ``fold`` and, as in format 1, no ``kind``;
    any other kind (the localizer) names itself. ``engine.checkpoint.save_checkpoint`` adds
    the format version and class names.

    Args:
        cfg: the run's resolved config.
        epoch: the epoch the weights are from.
        model: the network whose ``state_dict`` is saved.
        kind: ``CLASSIFIER`` or ``LOCALIZER``.
        fold: the classifier's validation fold.
        extra: the file's own keys: ``metrics`` (best.pt), the resume state (last.pt),
            ``n_averaged`` (swa.pt), ``task`` (localizer), ...
    """
    head: dict[str, Any] = {"config": config_to_dict(cfg), "epoch": epoch}
    if kind == CLASSIFIER:
        head["fold"] = fold
    else:
        head["kind"] = kind
    return {**head, "model": model.state_dict(), **extra}


@dataclass(frozen=True)
class RunCheckpoint:
    """A checkpoint read back by :func:`read_checkpoint`.

    Attributes:
        path: the file.
        config: the resolved config as saved (a plain dict).
        epoch: the epoch of the weights.
        model: the weights (a state dict).
        fold: the classifier's validation fold (None for other kinds).
        extra: the file's other keys (``metrics``, ``optimizer``, ``state``, ``task``, ...).
    """

    path: Path
    config: dict[str, Any]
    epoch: int
    model: dict[str, Any]
    fold: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        """The saved config as a typed ``Config``."""
        return config_from_dict(self.config)


def read_checkpoint(path: str | Path, kind: str = CLASSIFIER, map_location: Any = "cpu"
                    ) -> RunCheckpoint:
    """Load a checkpoint (``weights_only=True``) and check that it is one of ``kind``.

    Raises:
        UserError: missing, unreadable or of another format (see ``load_checkpoint``), or not
            a ``kind`` checkpoint.
    """
    # torch is imported only here: the CLI imports this module while it builds its parser.
    from spinegrade.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(path, map_location=map_location)
    if ck.get("kind", CLASSIFIER) != kind or "config" not in ck:
        raise UserError(f"{path}: not a {kind} checkpoint")
    return RunCheckpoint(Path(path), ck["config"], int(ck["epoch"]), ck["model"], ck.get("fold"),
                         {k: v for k, v in ck.items() if k not in _CORE_KEYS})


# --- what `predict` writes ---------------------------------------------------------------------
# Beside its submission CSV, each named after it (side_file): two predictions in one folder
# (e.g. --study runs) never overwrite each other's files.
SUBMISSION_FILE = "submission.csv"
LOCATIONS_FILE = "locations.csv"
STUDIES_FILE = "studies.csv"
LOCALIZATION_FILE = "localization.csv"  # on a labelled split: engine/localization_check.py


def default_submission(study_dir: str | None) -> str:
    """The submission CSV when --out is not given: ``<study>_submission.csv`` for one study."""
    return f"{Path(study_dir).name}_{SUBMISSION_FILE}" if study_dir else SUBMISSION_FILE


def side_file(out: Path, name: str) -> Path:
    """``<stem>_<name>`` beside the submission ``out`` (e.g. ``submission_problems.csv``)."""
    return out.with_name(f"{out.stem}_{name}")


def figures_dir(out: Path) -> Path:
    """Where ``predict.figures`` puts the per-study PNGs: ``<stem>_figures/`` beside ``out``."""
    return out.parent / f"{out.stem}_figures"


def config_copy(out: Path) -> Path:
    """The resolved config beside the submission, named after it (never a user's config.yaml)."""
    return out.with_name(f"{out.stem}_config.yaml")
