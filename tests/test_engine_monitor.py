"""Health table and dead-class alarm on hand-made metric sequences."""

from __future__ import annotations

import pandas as pd
import pytest

from engine_fixtures import make_cache, tiny_config
from spinegrade.config import EvalConfig
from spinegrade.engine.monitor import ALARM, PASS, PENDING, WARN, DeadClassMonitor, health_table


def _row(epoch, ba=0.8, normal=0.8, moderate=0.6, severe=0.6, train=0.50, val=0.52,
         counts=(10, 5, 5)):
    return {"epoch": epoch, "balanced_accuracy": ba, "train_loss": train, "val_loss": val,
            "recall_normal_mild": normal, "recall_moderate": moderate, "recall_severe": severe,
            "pred_count_normal_mild": counts[0], "pred_count_moderate": counts[1],
            "pred_count_severe": counts[2]}


def _status(rows):
    return {it["item"]: it["status"] for it in health_table(rows, EvalConfig())}


def test_healthy_run_passes_everything():
    rows = [_row(e, ba=0.80 + 0.002 * e) for e in range(1, 7)]
    assert set(_status(rows).values()) == {PASS}


@pytest.mark.parametrize("overrides, item, expected", [
    (dict(severe=0.2), "min class recall", ALARM),            # epoch 3: past the deadline
    (dict(normal=0.95), "Normal/Mild recall", ALARM),         # > 90%
    (dict(normal=0.88), "Normal/Mild recall", WARN),          # outside 75-85%, not > 90%
    (dict(normal=0.70), "Normal/Mild recall", WARN),
    (dict(val=0.58), "train-val loss gap", WARN),             # gap 0.08
    (dict(val=0.65), "train-val loss gap", ALARM),            # gap 0.15
    (dict(val=0.40), "train-val loss gap", PASS),             # val below train: fine
    (dict(moderate=0.4), "Moderate & Severe recall (min)", WARN),
    (dict(severe=0.25), "Moderate & Severe recall (min)", ALARM),
    (dict(counts=(20, 0, 0)), "dead classes", ALARM),
])
def test_each_item_at_epoch_3(overrides, item, expected):
    rows = [_row(1), _row(2), _row(3, **overrides)]
    assert _status(rows)[item] == expected


def test_min_recall_pending_before_epoch_3_and_ba_spread_needs_5_epochs():
    early = _status([_row(1, severe=0.0), _row(2, severe=0.1)])
    assert early["min class recall"] == PENDING
    assert early["BA spread"] == PENDING
    # The jump from 0.5 is outside the last 5 epochs, which span 0.02.
    steady = _status([_row(e, ba=b) for e, b in enumerate([0.5, 0.80, 0.81, 0.79, 0.80, 0.81], 1)])
    assert steady["BA spread"] == PASS
    noisy = _status([_row(e, ba=b) for e, b in enumerate([0.80, 0.74, 0.81, 0.79, 0.80], 1)])
    assert noisy["BA spread"] == WARN


@pytest.mark.parametrize("action", ["warn", "reset_bias", "stop"])
def test_dead_class_two_epochs_running_triggers_action(action):
    mon = DeadClassMonitor(patience=2, action=action)
    assert mon.update((5, 3, 2), epoch=1) == ([], None)
    assert mon.update((8, 2, 0), epoch=2) == (["severe"], None)      # warned, not yet acted
    assert mon.update((8, 2, 0), epoch=3) == (["severe"], action)    # 2 consecutive: act
    assert mon.update((8, 2, 0), epoch=4) == (["severe"], None)      # counter restarted


def test_dead_class_streak_must_be_consecutive_and_survives_state_dict():
    mon = DeadClassMonitor(patience=2, action="stop")
    mon.update((8, 2, 0), epoch=1)
    mon.update((8, 1, 1), epoch=2)
    other = DeadClassMonitor(patience=2, action="stop")
    other.load_state_dict(mon.state_dict())
    assert other.update((8, 2, 0), epoch=3) == (["severe"], None)
    assert other.update((10, 0, 0), epoch=4) == (["moderate", "severe"], "stop")


def test_dead_class_warning_is_visible(caplog):
    DeadClassMonitor().update({"normal_mild": 9, "moderate": 0, "severe": 1}, epoch=1)
    assert "DEAD CLASS" in caplog.text and "moderate" in caplog.text


def test_fit_stops_when_a_class_stays_dead(tmp_path):
    # Head frozen at a prior that favours Normal/Mild: only Normal is ever predicted.
    cache = make_cache(tmp_path / "cache", n_studies=6)
    cfg = tiny_config("data.folds=2", "train.epochs=4", "train.freeze_epochs=4",
                      "train.frozen_head_lr=0.0", "train.swa=false",
                      "model.prior_logits=[9.0, -9.0, -9.0]", "train.dead_class_action=stop")
    from spinegrade.engine.train import fit

    summary = fit(cfg, cache.path, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run/metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert summary["stopped_early"]
    assert metrics["dead_class_action"].tolist()[-1] == "stop"


def test_class_absent_from_validation_is_not_an_alarm():
    """A class with no validation samples has NaN recall: reported n/a, never min()'d in."""
    from spinegrade.config import EvalConfig
    from spinegrade.engine.monitor import health_table

    row = dict(epoch=5, balanced_accuracy=0.8, recall_normal_mild=0.8,
               recall_moderate=float("nan"), recall_severe=0.6, train_loss=0.5, val_loss=0.52,
               pred_count_normal_mild=10, pred_count_moderate=0, pred_count_severe=3)
    items = {i["item"]: i for i in health_table([row], EvalConfig())}
    assert items["min class recall"]["value"] == 0.6
    assert items["min class recall"]["status"] == "pass"
    assert items["Moderate & Severe recall (min)"]["value"] == 0.6
    assert items["Moderate & Severe recall (min)"]["status"] == "pass"  # 0.6 > 50%
    # Every class absent: nothing to judge.
    empty = dict(row, recall_normal_mild=float("nan"), recall_severe=float("nan"))
    items = {i["item"]: i for i in health_table([empty], EvalConfig())}
    assert items["min class recall"]["status"] == "n/a"
    assert items["Normal/Mild recall"]["status"] == "n/a"
