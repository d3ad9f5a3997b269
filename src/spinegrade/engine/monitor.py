"""Training health: the plan's "Metrics to watch" table and the dead-class alarm.

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


def _item(name: str, value: float | None, target: str, alarm: str, status: str,
          **extra: float | None) -> dict:
    out = {"item": name, "value": None if value is None else round(float(value), 4),
           "target": target, "alarm": alarm, "status": status}
    out.update({k: None if v is None else round(float(v), 4) for k, v in extra.items()})
    return out


def _present(value: float | None) -> float | None:
    """A recall, or None when the class is absent from validation (NaN)."""
    return None if value is None or value != value else float(value)


def _present_min(values: list[float | None]) -> float | None:
    """Smallest recall among the classes present in validation (NaN/None = class absent)."""
    present = [v for v in map(_present, values) if v is not None]
    return min(present) if present else None


# Row names, exactly the plan's "Metrics to watch".
MIN_RECALL = "Min class recall"
BA_STABILITY = "Balanced accuracy"
NORMAL_RECALL = "Normal/Mild recall"
LOSS_GAP = "Train-val loss gap"
MODERATE_RECALL = "Moderate recall"
SEVERE_RECALL = "Severe recall"
ROWS = (MIN_RECALL, BA_STABILITY, NORMAL_RECALL, LOSS_GAP, MODERATE_RECALL, SEVERE_RECALL)


def _min_recall(rows: list[dict], ecfg: EvalConfig) -> dict:
    last = rows[-1]
    value = _present_min([last[f"recall_{c}"] for c in CLASS_NAMES])
    target = f"> {ecfg.min_recall:.0%} by epoch {ecfg.min_recall_by_epoch}"
    alarm = f"{ecfg.min_recall_alarm:.0%} for any class at any epoch"
    if value is None:
        return _item(MIN_RECALL, None, target, alarm, NA)
    if value <= ecfg.min_recall_alarm:
        return _item(MIN_RECALL, value, target, alarm, ALARM)
    if value > ecfg.min_recall:
        return _item(MIN_RECALL, value, target, alarm, PASS)
    # Before the deadline a low recall is expected (the head starts at the priors).
    status = WARN if last["epoch"] >= ecfg.min_recall_by_epoch else PENDING
    return _item(MIN_RECALL, value, target, alarm, status)


def _ba_stability(rows: list[dict], ecfg: EvalConfig) -> dict:
    """Spread (max - min, judged) and standard deviation (shown) of the last epochs' BA."""
    n = ecfg.ba_spread_window
    target = f"spread < {ecfg.ba_spread_max:.0%} over the last {n} epochs"
    alarm = f"spread > {ecfg.ba_spread_alarm:.0%} (unstable)"
    ba = [_present(r["balanced_accuracy"]) for r in rows[-n:]]
    if len(rows) < n or any(v is None for v in ba):
        return _item(BA_STABILITY, None, target, alarm, PENDING, std=None)
    spread, std = max(ba) - min(ba), float(np.std(ba))
    status = (ALARM if spread > ecfg.ba_spread_alarm else
              PASS if spread < ecfg.ba_spread_max else WARN)
    return _item(BA_STABILITY, spread, target, alarm, status, std=std)


def _normal_recall(rows: list[dict], ecfg: EvalConfig) -> dict:
    lo, hi = ecfg.normal_recall_range
    value = _present(rows[-1][f"recall_{NORMAL}"])
    target = f"{lo:.0%}-{hi:.0%}"
    alarm = f"> {ecfg.normal_recall_alarm:.0%} (collapsing to the majority class)"
    if value is None:
        return _item(NORMAL_RECALL, None, target, alarm, NA)
    status = ALARM if value > ecfg.normal_recall_alarm else PASS if lo <= value <= hi else WARN
    return _item(NORMAL_RECALL, value, target, alarm, status)


def _loss_gap(rows: list[dict], ecfg: EvalConfig) -> dict:
    # Positive gap = validation loss above training loss (overfitting); a negative gap is
    # what augmentation and dropout produce early on and is not a problem.
    gap = rows[-1]["val_loss"] - rows[-1]["train_loss"]
    target = f"< {ecfg.loss_gap_max:g}"
    alarm = f"> {ecfg.loss_gap_alarm:g} (overfitting)"
    status = ALARM if gap > ecfg.loss_gap_alarm else PASS if gap < ecfg.loss_gap_max else WARN
    return _item(LOSS_GAP, gap, target, alarm, status)


def _class_recall(rows: list[dict], ecfg: EvalConfig, name: str, cls: str) -> dict:
    value = _present(rows[-1][f"recall_{cls}"])
    target = f"> {ecfg.minority_recall_target:.0%}"
    alarm = f"< {ecfg.minority_recall_alarm:.0%}"
    if value is None:
        return _item(name, None, target, alarm, NA)
    status = (ALARM if value < ecfg.minority_recall_alarm else
              PASS if value > ecfg.minority_recall_target else WARN)
    return _item(name, value, target, alarm, status)


def health_table(rows: list[dict], ecfg: EvalConfig) -> list[dict]:
    """The plan's six "Metrics to watch" after the last of ``rows`` (one dict per epoch).

    Each row needs ``epoch``, ``train_loss``, ``val_loss``, ``balanced_accuracy`` and
    ``recall_<class>``. A class absent from validation (NaN recall) is ``n/a``.

    Returns:
        One dict per metric, in the plan's order: ``item``, ``value``, ``target`` (the
        healthy range), ``alarm`` (the alarm condition), ``status`` (pass / warn / alarm /
        pending / n/a); the balanced-accuracy row adds ``std`` (its ``value`` is the spread).
    """
    if not rows:
        return []
    return [_min_recall(rows, ecfg), _ba_stability(rows, ecfg), _normal_recall(rows, ecfg),
            _loss_gap(rows, ecfg), _class_recall(rows, ecfg, MODERATE_RECALL, MODERATE),
            _class_recall(rows, ecfg, SEVERE_RECALL, SEVERE)]


def format_health(table: list[dict]) -> str:
    """The health table as aligned text lines (value, status, healthy range, alarm)."""
    lines = []
    for it in table:
        value = "-" if it["value"] is None else f"{it['value']:.3f}"
        if it.get("std") is not None:
            value = f"spread {value} std {it['std']:.3f}"
        flag = "  <-- ALARM" if it["status"] == ALARM else ""
        lines.append(f"  {it['item']:<34} {value:>23}  {it['status']:<7} healthy "
                     f"{it['target']}; alarm {it['alarm']}{flag}")
    return "\n".join(lines)


@dataclass
class DeadClassMonitor:
    """Counts consecutive epochs in which some class received no predictions.

    Warns at once for every dead class; after ``patience`` consecutive dead epochs for the
    same class (the plan: two), :meth:`update` returns the configured action
    (``train.dead_class_action``, :data:`spinegrade.choices.DEAD_CLASS_ACTIONS`) so the
    caller can carry it out. The counter restarts after an action fires.
    """

    patience: int = 2
    action: str = "reset_bias_boost"
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
