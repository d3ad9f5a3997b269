"""The v8 phase schedule: frozen epochs, cosine fine-tuning, SWA over the configured epochs."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import spinegrade.engine.train as train_mod
from engine_fixtures import make_cache, tiny_config
from spinegrade.config import load_config
from spinegrade.engine.checkpoint import load_checkpoint
from spinegrade.engine.schedule import FINETUNE, FROZEN, SWA, PhaseSchedule


def test_v8_schedule_numbers():
    cfg = load_config("v8")
    s = PhaseSchedule.from_config(cfg.train, steps_per_epoch=10)
    assert [s.phase(e) for e in (1, 2, 3, 19, 20, 25)] == [FROZEN, FROZEN, FINETUNE, FINETUNE, SWA, SWA]
    assert [s.backbone_trainable(e) for e in (1, 2, 3)] == [False, False, True]
    for e in (1, 2):
        assert s.lrs(e, 0) == s.lrs(e, 9) == {"backbone": 0.0, "head": 3e-4}
    assert s.lrs(3, 0) == pytest.approx({"backbone": 1e-5, "head": 1e-4})
    assert s.lrs(25, 9) == pytest.approx({"backbone": 1e-6, "head": 1e-6})
    # Halfway through the 23 fine-tune epochs the cosine is at its midpoint.
    total = 23 * 10
    t = total // 2
    mid = 1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t / (total - 1)))
    assert s.lrs(3 + t // 10, t % 10)["head"] == pytest.approx(mid)
    heads = [s.lrs(e, k)["head"] for e in range(3, 26) for k in range(10)]
    assert all(a > b for a, b in zip(heads[:-1], heads[1:], strict=True))  # no restarts
    assert [e for e in range(1, 26) if s.in_swa(e)] == [20, 21, 22, 23, 24, 25]


def test_fit_follows_the_phases_and_swa_averages_exactly_the_window(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "cache", n_studies=9)
    # warn: the dead-class boost (the default action) would change the learning rates.
    cfg = tiny_config("train.epochs=5", "train.swa_start_epoch=4", "train.augment=false",
                      "train.dead_class_action=warn")
    seen_lrs: list[dict] = []
    apply = train_mod.apply_lrs
    monkeypatch.setattr(train_mod, "apply_lrs",
                        lambda opt, lrs: (seen_lrs.append(dict(lrs)), apply(opt, lrs)))
    trainable: dict[int, tuple[bool, bool]] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(epoch, model):
        flags = [p.requires_grad for p in model.backbone_parameters()]
        trainable[epoch] = (all(flags), any(flags))
        weights[epoch] = {k: v.detach().clone() for k, v in model.named_parameters()}

    train_mod.fit(cfg, cache.path, tmp_path / "run", on_epoch_end=on_epoch_end)

    assert trainable == {1: (False, False), 2: (False, False), 3: (True, True),
                         4: (True, True), 5: (True, True)}
    steps = len(seen_lrs) // 5
    sched = PhaseSchedule.from_config(cfg.train, steps)
    assert seen_lrs == [sched.lrs(e, k) for e in range(1, 6) for k in range(steps)]
    assert seen_lrs[0] == {"backbone": 0.0, "head": 3e-4}
    assert seen_lrs[2 * steps] == pytest.approx({"backbone": 1e-5, "head": 1e-4})
    assert seen_lrs[-1] == pytest.approx({"backbone": 1e-6, "head": 1e-6})
    metrics = pd.read_csv(tmp_path / "run/metrics.csv")
    assert metrics["phase"].tolist() == [FROZEN, FROZEN, FINETUNE, SWA, SWA]
    assert metrics["lr_head"].tolist()[:3] == pytest.approx([3e-4, 3e-4, 1e-4])

    swa = load_checkpoint(tmp_path / "run/checkpoints/swa.pt")
    assert swa["n_averaged"] == 5 - 4 + 1
    compared = 0
    for name, value in swa["model"].items():
        if name in weights[4]:  # parameters; BN buffers were recomputed
            expected = (weights[4][name] + weights[5][name]) / 2
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
            compared += 1
    assert compared == len(weights[4]) > 0  # every parameter was found and compared
    # BatchNorm statistics were recomputed, not left at the initial copy's values.
    last = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["model"]
    bn_key = next(k for k in swa["model"] if k.endswith("running_mean"))
    assert not torch.equal(swa["model"][bn_key], last[bn_key])


def test_warm_restarts_return_to_the_base_rate_at_the_restart_step():
    cfg = load_config("v8", ["train.lr_schedule=cosine_restarts", "train.lr_restart_epochs=3",
                             "train.freeze_epochs=2", "train.epochs=12", "train.swa=false"])
    s = PhaseSchedule.from_config(cfg.train, steps_per_epoch=10)
    base, low = 1e-4, 1e-6
    # Cycle 1: fine-tune epochs 3, 4, 5 (30 steps); its last step is 29/30 of the way down.
    assert s.lrs(3, 0)["head"] == pytest.approx(base)
    last = low + (base - low) * 0.5 * (1 + math.cos(math.pi * 29 / 30))
    assert s.lrs(5, 9)["head"] == pytest.approx(last)
    assert last < 2e-6
    # The restart step: first step of epoch 6 is back at the base rates.
    assert s.lrs(6, 0) == pytest.approx({"backbone": 1e-5, "head": base})
    mid = low + (base - low) * 0.5 * (1 + math.cos(math.pi * 15 / 30))
    assert s.lrs(7, 5)["head"] == pytest.approx(mid)   # step 15 of cycle 2
    assert s.lrs(9, 0)["head"] == pytest.approx(base)  # cycle 3 starts
    # Frozen epochs are untouched, and plain cosine has no restart at epoch 6.
    assert s.lrs(1, 0) == {"backbone": 0.0, "head": 3e-4}
    plain = PhaseSchedule.from_config(load_config("v8", ["train.epochs=12", "train.swa=false"]).train, 10)
    assert plain.lrs(6, 0)["head"] < plain.lrs(5, 9)["head"]


def test_warm_restart_cycles_grow_by_the_multiplier():
    cfg = load_config("v8", ["train.lr_schedule=cosine_restarts", "train.lr_restart_epochs=2",
                             "train.lr_restart_mult=2", "train.freeze_epochs=0", "train.epochs=14",
                             "train.swa=false"])
    s = PhaseSchedule.from_config(cfg.train, steps_per_epoch=4)
    heads = [s.lrs(e, k)["head"] for e in range(1, 15) for k in range(4)]
    restarts = [i for i in range(1, len(heads)) if heads[i] > heads[i - 1]]
    assert restarts == [8, 24]  # cycles of 2, 4, 8 epochs x 4 steps
    for v in ("v4", "v5", "v6", "v7"):
        assert load_config(f"configs/{v}.yaml").train.lr_schedule == "cosine_restarts"
