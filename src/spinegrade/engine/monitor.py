"""Training health: the seed's health table and the dead-class alarm.

Both work on plain per-epoch metric rows (dicts as written to ``metrics.csv``), so they can
be checked on hand-made sequences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from spinegrade.config import EvalConfig
from spinegrade.constants import CLASS_NAMES

log = logging.getLogger(__name__)

PASS, WARN, ALARM, PENDING, NA = "pass", "warn", "alarm", "pending", "n/a"
NORMAL, MODERATE, SEVERE = CLASS_NAMES


def _item(name: str, value: float | None, target: str, status: str) -> dict:
    return {"item": name, "value": None if value is None else round(float(value), 4),
            "target": target, "status": status}


def _present_min(values: list[float | None]) -> float | None:
    """Smallest recall among the classes present in validation (NaN/None = class absent)."""
    present = [v for v in values if v is not None and v == v]
    return min(present) if present else None


def _min_recall(rows: list[dict], ecfg: EvalConfig) -> dict:
    last = rows[-1]
    value = _present_min([last[f"recall_{c}"] for c in CLASS_NAMES])
    target = f"> {ecfg.min_recall:.0%} by epoch {ecfg.min_recall_by_epoch}"
    if value is None:
        return _item("min class recall", None, target, NA)
    if value > ecfg.min_recall:
        return _item("min class recall", value, target, PASS)
    # Before the deadline a low recall is expected (the head starts at the priors).
    status = ALARM if last["epoch"] >= ecfg.min_recall_by_epoch else PENDING
    return _item("min class recall", value, target, status)


def _ba_spread(rows: list[dict], ecfg: EvalConfig) -> dict:
    target = f"< {ecfg.ba_spread_max:.0%} over the last {ecfg.ba_spread_window} epochs"
    if len(rows) < ecfg.ba_spread_window:
        return _item("BA spread", None, target, PENDING)
    ba = [r["balanced_accuracy"] for r in rows[-ecfg.ba_spread_window:]]
    spread = max(ba) - min(ba)
    return _item("BA spread", spread, target, PASS if spread < ecfg.ba_spread_max else WARN)


def _normal_recall(rows: list[dict], ecfg: EvalConfig) -> dict:
    lo, hi = ecfg.normal_recall_range
    value = _present_min([rows[-1][f"recall_{NORMAL}"]])
    target = f"{lo:.0%}-{hi:.0%} (alarm > {ecfg.normal_recall_alarm:.0%})"
    if value is None:
        return _item("Normal/Mild recall", None, target, NA)
    status = ALARM if value > ecfg.normal_recall_alarm else PASS if lo <= value <= hi else WARN
    return _item("Normal/Mild recall", value, target, status)


def _loss_gap(rows: list[dict], ecfg: EvalConfig) -> dict:
    # Positive gap = validation loss above training loss (overfitting); a negative gap is
    # what augmentation and dropout produce early on and is not a problem.
    gap = rows[-1]["val_loss"] - rows[-1]["train_loss"]
    target = f"< {ecfg.loss_gap_max:g} (alarm > {ecfg.loss_gap_alarm:g})"
    status = ALARM if gap > ecfg.loss_gap_alarm else PASS if gap < ecfg.loss_gap_max else WARN
    return _item("train-val loss gap", gap, target, status)


def _minority_recall(rows: list[dict], ecfg: EvalConfig) -> dict:
    value = _present_min([rows[-1][f"recall_{MODERATE}"], rows[-1][f"recall_{SEVERE}"]])
    target = (f"> {ecfg.minority_recall_target:.0%} each "
              f"(alarm < {ecfg.minority_recall_alarm:.0%})")
    if value is None:
        return _item("Moderate & Severe recall (min)", None, target, NA)
    if value < ecfg.minority_recall_alarm:
        status = ALARM
    else:
        status = PASS if value > ecfg.minority_recall_target else WARN
    return _item("Moderate & Severe recall (min)", value, target, status)


def _dead_classes(rows: list[dict]) -> dict:
    dead = [c for c in CLASS_NAMES if rows[-1][f"pred_count_{c}"] == 0]
    return _item("dead classes", len(dead), "none (no class with zero predictions)",
                 ALARM if dead else PASS)


def health_table(rows: list[dict], ecfg: EvalConfig) -> list[dict]:
    """Evaluate the health table after the last of ``rows`` (one dict per epoch so far).

    Each row needs ``epoch``, ``train_loss``, ``val_loss``, ``balanced_accuracy``,
    ``recall_<class>`` and ``pred_count_<class>``.

    Returns:
        One dict per item: ``item``, ``value``, ``target``, ``status`` (pass / warn / alarm /
        pending).
    """
    if not rows:
        return []
    return [_min_recall(rows, ecfg), _ba_spread(rows, ecfg), _normal_recall(rows, ecfg),
            _loss_gap(rows, ecfg), _minority_recall(rows, ecfg), _dead_classes(rows)]


def format_health(table: list[dict]) -> str:
    """The health table as aligned text lines."""
    lines = []
    for it in table:
        value = "-" if it["value"] is None else f"{it['value']:.3f}"
        flag = "  <-- ALARM" if it["status"] == ALARM else ""
        lines.append(f"  {it['item']:<32} {value:>7}  {it['status']:<7} target {it['target']}{flag}")
    return "\n".join(lines)


@dataclass
class DeadClassMonitor:
    """Counts consecutive epochs in which some class received no predictions.

    Warns at once for every dead class; after ``patience`` consecutive dead epochs for the
    same class, :meth:`update` returns the configured action (warn / reset_bias / stop) so
    the caller can carry it out. The counter restarts after an action fires.
    """

    patience: int = 2
    action: str = "warn"
    streak: dict[str, int] = field(default_factory=lambda: {c: 0 for c in CLASS_NAMES})

    def update(self, pred_counts: dict[str, int] | np.ndarray, epoch: int) -> tuple[list[str], str | None]:
        """Record one epoch's prediction counts per class.

        Returns:
            (dead class names this epoch, action to take now or None).
        """
        counts = (dict(zip(CLASS_NAMES, pred_counts, strict=True)) if not isinstance(pred_counts, dict)
                  else pred_counts)
        dead = [c for c in CLASS_NAMES if int(counts[c]) == 0]
        for c in CLASS_NAMES:
            self.streak[c] = self.streak[c] + 1 if c in dead else 0
        if dead:
            log.warning("DEAD CLASS at epoch %d: no predictions for %s", epoch, ", ".join(dead))
        if any(self.streak[c] >= self.patience for c in dead):
            log.warning("dead class for %d consecutive epochs: action '%s'", self.patience,
                        self.action)
            self.streak = {c: 0 for c in CLASS_NAMES}
            return dead, self.action
        return dead, None

    def state_dict(self) -> dict:
        """Counters for checkpoints."""
        return {"streak": dict(self.streak)}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by :meth:`state_dict`."""
        self.streak = {c: int(state["streak"][c]) for c in CLASS_NAMES}
