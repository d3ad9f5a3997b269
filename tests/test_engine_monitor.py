"""Health table and dead-class alarm on hand-made metric sequences."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

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


def test_the_table_is_the_plans_six_rows_in_order():
    items = health_table([_row(1)], EvalConfig())
    assert [it["item"] for it in items] == [
        "Min class recall", "Balanced accuracy", "Normal/Mild recall", "Train-val loss gap",
        "Moderate recall", "Severe recall"]
    assert all({"item", "value", "target", "alarm", "status"} <= set(it) for it in items)


def test_healthy_run_passes_everything():
    rows = [_row(e, ba=0.80 + 0.002 * e) for e in range(1, 7)]
    assert set(_status(rows).values()) == {PASS}


# The plan's thresholds, each probed just inside and just outside (values by hand).
@pytest.mark.parametrize("overrides, item, expected", [
    # Min class recall: healthy > 30% by epoch 3; alarm 0% for any class at any epoch.
    (dict(severe=0.31), "Min class recall", PASS),
    (dict(severe=0.29), "Min class recall", WARN),            # epoch 3: past the deadline
    (dict(severe=0.01), "Min class recall", WARN),
    (dict(severe=0.0), "Min class recall", ALARM),
    # Normal/Mild recall: healthy 75-85%; alarm > 90%.
    (dict(normal=0.751), "Normal/Mild recall", PASS),
    (dict(normal=0.749), "Normal/Mild recall", WARN),
    (dict(normal=0.849), "Normal/Mild recall", PASS),
    (dict(normal=0.851), "Normal/Mild recall", WARN),
    (dict(normal=0.899), "Normal/Mild recall", WARN),
    (dict(normal=0.901), "Normal/Mild recall", ALARM),
    # Train-val loss gap: healthy < 0.05; alarm > 0.1 (train loss 0.50).
    (dict(val=0.549), "Train-val loss gap", PASS),
    (dict(val=0.551), "Train-val loss gap", WARN),
    (dict(val=0.599), "Train-val loss gap", WARN),
    (dict(val=0.601), "Train-val loss gap", ALARM),
    (dict(val=0.40), "Train-val loss gap", PASS),             # val below train: fine
    # Moderate and Severe recall, one row each: healthy > 50%; alarm < 30%.
    (dict(moderate=0.51), "Moderate recall", PASS),
    (dict(moderate=0.49), "Moderate recall", WARN),
    (dict(moderate=0.31), "Moderate recall", WARN),
    (dict(moderate=0.29), "Moderate recall", ALARM),
    (dict(severe=0.51), "Severe recall", PASS),
    (dict(severe=0.49), "Severe recall", WARN),
    (dict(severe=0.31), "Severe recall", WARN),
    (dict(severe=0.29), "Severe recall", ALARM),
])
def test_each_threshold_at_epoch_3(overrides, item, expected):
    rows = [_row(1), _row(2), _row(3, **overrides)]
    assert _status(rows)[item] == expected


def test_rows_are_independent_moderate_alarm_leaves_severe_healthy():
    status = _status([_row(1), _row(2), _row(3, moderate=0.2, severe=0.7)])
    assert status["Moderate recall"] == ALARM and status["Severe recall"] == PASS


def test_zero_recall_alarms_at_any_epoch_and_low_recall_waits_for_epoch_3():
    assert _status([_row(1, moderate=0.0)])["Min class recall"] == ALARM
    early = _status([_row(1, severe=0.1), _row(2, severe=0.1)])
    assert early["Min class recall"] == PENDING


@pytest.mark.parametrize("bas, spread, expected", [
    ([0.80, 0.81, 0.829, 0.82, 0.80], 0.029, PASS),   # spread < 3%
    ([0.80, 0.81, 0.831, 0.82, 0.80], 0.031, WARN),
    ([0.80, 0.849, 0.83, 0.82, 0.80], 0.049, WARN),
    ([0.80, 0.851, 0.83, 0.82, 0.80], 0.051, ALARM),  # > 5% = unstable
])
def test_ba_row_spread_and_std_over_the_last_5_epochs(bas, spread, expected):
    # A first epoch far below: outside the window, so it must not count.
    rows = [_row(e, ba=b) for e, b in enumerate([0.3, *bas], 1)]
    ba_item = next(it for it in health_table(rows, EvalConfig()) if it["item"] == "Balanced accuracy")
    assert ba_item["status"] == expected
    assert ba_item["value"] == pytest.approx(spread, abs=1e-4)
    mean = sum(bas) / 5
    std = (sum((b - mean) ** 2 for b in bas) / 5) ** 0.5   # population std, by hand
    assert ba_item["std"] == pytest.approx(std, abs=1e-4)


def test_ba_row_pending_before_5_epochs():
    rows = [_row(e) for e in range(1, 5)]
    ba_item = next(it for it in health_table(rows, EvalConfig()) if it["item"] == "Balanced accuracy")
    assert ba_item["status"] == PENDING and ba_item["value"] is None


def test_format_health_shows_spread_std_and_both_ranges():
    from spinegrade.engine.monitor import format_health

    rows = [_row(e, ba=b) for e, b in enumerate([0.80, 0.86, 0.80, 0.80, 0.80], 1)]
    text = format_health(health_table(rows, EvalConfig()))
    assert "spread 0.060 std 0.024" in text
    assert "alarm spread > 5% (unstable)" in text and "<-- ALARM" in text
    assert "healthy > 30% by epoch 3; alarm 0% for any class at any epoch" in text


@pytest.mark.parametrize("action", ["warn", "reset_bias", "reset_bias_boost", "stop"])
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
    assert items["Min class recall"]["value"] == 0.6
    assert items["Min class recall"]["status"] == "pass"
    assert items["Moderate recall"]["status"] == "n/a"
    assert items["Severe recall"]["value"] == 0.6
    assert items["Severe recall"]["status"] == "pass"  # 0.6 > 50%
    # Every class absent: nothing to judge.
    empty = dict(row, recall_normal_mild=float("nan"), recall_severe=float("nan"))
    items = {i["item"]: i for i in health_table([empty], EvalConfig())}
    assert items["Min class recall"]["status"] == "n/a"
    assert items["Normal/Mild recall"]["status"] == "n/a"


def _run_with_dead_moderate(tmp_path, action):
    """A constructed run: the head's Moderate bias starts at -30, so Moderate is never
    predicted; the head trains alone (frozen backbone) at a rate too low to recover."""
    import spinegrade.engine.train as train_mod

    cache = make_cache(tmp_path / "cache", n_studies=12)
    cfg = tiny_config("train.epochs=4", "train.freeze_epochs=4", "train.frozen_head_lr=3e-4",
                      "train.swa=false", "train.augment=false",
                      "model.prior_logits=[0.0, 0.0, 0.0]", f"train.dead_class_action={action}")
    build = train_mod.make_run_model

    def killed_moderate(*args, **kwargs):
        model, loss = build(*args, **kwargs)
        with torch.no_grad():
            model.head.fc.bias[1] = -30.0   # the prior buffer stays [0, 0, 0]
        return model, loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "make_run_model", killed_moderate)
        train_mod.fit(cfg, cache.path, tmp_path / action)
    return pd.read_csv(tmp_path / action / "metrics.csv")


def test_default_action_revives_a_dead_moderate_class(tmp_path):
    from spinegrade.config import TrainConfig

    assert TrainConfig().dead_class_action == "reset_bias_boost"
    m = _run_with_dead_moderate(tmp_path, "reset_bias_boost")
    assert m["pred_count_moderate"].tolist()[:2] == [0, 0]
    # Fires at the second dead epoch, boosts the head LR x10 for the next epoch only.
    assert m["dead_class_action"].fillna("").tolist()[:3] == ["", "reset_bias_boost", ""]
    assert m["lr_head"].tolist() == pytest.approx([3e-4, 3e-4, 3e-3, 3e-4])
    assert (m["pred_count_moderate"].iloc[2:4] > 0).any()
    # Control: only warning, the same run keeps Moderate dead.
    warned = _run_with_dead_moderate(tmp_path, "warn")
    assert warned["pred_count_moderate"].tolist() == [0, 0, 0, 0]
