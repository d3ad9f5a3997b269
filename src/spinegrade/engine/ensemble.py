"""``ensemble.yaml``: the classifier runs of a cross-validation, each with weight and calibration.

``spinegrade cv`` writes it; ``spinegrade predict --ensemble FILE`` reads it instead of a list
of ``--classifier RUN:WEIGHT`` flags (:func:`classifier_specs` gives exactly those flags).
Run paths are stored relative to the file, so a CV folder can be moved or copied whole.
The calibrations are fitted out of fold (``spinegrade.calibration``); ``predict`` does not
apply them yet (that wiring belongs to the end-to-end issue), they are recorded here so it
can.

Format (``format: 1``)::

    format: 1
    config: v8                      # the config name the runs were trained with
    localizer: /abs/path/or/null    # the localizer run to predict with, if cv was given one
    runs:
      - path: runs/spinal_canal_stenosis/fold0
        condition: spinal_canal_stenosis
        fold: 0
        seed: 42
        weight: 0.2
        checkpoint: swa             # the checkpoint final.json names (what oof.csv scores)
        calibration: {temperature: 1.1, bias: [0, 0, 0], prior_mix: 0, ...}
    conditions:
      spinal_canal_stenosis: {calibration: {...}}   # fitted on the pooled out-of-fold rows
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_write_text

ENSEMBLE_FORMAT = 1
ENSEMBLE_FILE = "ensemble.yaml"


@dataclass(frozen=True)
class EnsembleRun:
    """One classifier run of an ensemble."""

    path: Path
    condition: str
    fold: int
    seed: int
    weight: float
    checkpoint: str = ""
    calibration: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Ensemble:
    """What ``ensemble.yaml`` holds (run paths absolute once read)."""

    runs: tuple[EnsembleRun, ...]
    config: str = ""
    localizer: str | None = None
    conditions: dict = field(default_factory=dict)


def write_ensemble(path: str | Path, ensemble: Ensemble) -> Path:
    """Write ``ensemble`` as YAML atomically, run paths relative to the file's folder."""
    path = Path(path)
    base = path.parent.resolve()
    runs = []
    for r in ensemble.runs:
        p = Path(r.path).resolve()
        rel = p.relative_to(base) if p.is_relative_to(base) else p
        runs.append({"path": rel.as_posix(), "condition": r.condition, "fold": int(r.fold),
                     "seed": int(r.seed), "weight": float(r.weight), "checkpoint": r.checkpoint,
                     "calibration": r.calibration})
    doc = {"format": ENSEMBLE_FORMAT, "config": ensemble.config, "localizer": ensemble.localizer,
           "runs": runs, "conditions": ensemble.conditions}
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def read_ensemble(path: str | Path) -> Ensemble:
    """Read ``ensemble.yaml``; a ``UserError`` names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ensemble {path}: file not found (spinegrade cv writes CV/{ENSEMBLE_FILE})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT or not doc.get("runs"):
        raise UserError(f"{path}: not an ensemble file of format {ENSEMBLE_FORMAT} with runs")
    runs = []
    for i, r in enumerate(doc["runs"]):
        try:
            p = Path(r["path"])
            runs.append(EnsembleRun(p if p.is_absolute() else path.parent / p, str(r["condition"]),
                                    int(r["fold"]), int(r["seed"]), float(r["weight"]),
                                    str(r.get("checkpoint", "")), dict(r.get("calibration") or {})))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: run {i + 1} lacks or mistypes {e}") from None
        if runs[-1].weight <= 0:
            raise UserError(f"{path}: run {i + 1} ({r['path']}) needs a positive weight")
    return Ensemble(tuple(runs), str(doc.get("config", "")), doc.get("localizer"),
                    dict(doc.get("conditions") or {}))


def classifier_specs(ensemble: Ensemble) -> list[str]:
    """The ``RUN:WEIGHT`` specs ``predict --classifier`` takes for the same runs and weights."""
    return [f"{r.path}:{r.weight!r}" for r in ensemble.runs]


def equal_weights(conditions: Sequence[str]) -> dict[str, float]:
    """Weight of each run of a condition so that a condition's weights sum to one."""
    counts: dict[str, int] = {}
    for c in conditions:
        counts[c] = counts.get(c, 0) + 1
    return {c: 1.0 / n for c, n in counts.items()}


__all__ = ["ENSEMBLE_FILE", "Ensemble", "EnsembleRun", "classifier_specs", "equal_weights",
           "read_ensemble", "write_ensemble"]
