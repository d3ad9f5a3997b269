"""Kill training with SIGKILL after epoch 2, resume, and get the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from engine_fixtures import cli_args, make_cache
from spinegrade.engine.checkpoint import load_checkpoint
from spinegrade.engine.train import KILL_ENV


def _train(cache, out, *extra, env=None):
    cmd = [sys.executable, "-m", "spinegrade.cli", "train", "--config", "v8", "--cache",
           str(cache), "--out", str(out), *cli_args(), *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sigkill_after_epoch_2_then_resume_equals_uninterrupted(tmp_path):
    cache = make_cache(tmp_path / "cache").path
    full = _train(cache, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _train(cache, tmp_path / "resumed", env={KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["epoch"] == 2
    assert not (tmp_path / "resumed/checkpoints/swa.pt").exists()

    resumed = _train(cache, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    for name in ("last", "swa", "best"):
        a = load_checkpoint(tmp_path / f"full/checkpoints/{name}.pt")
        b = load_checkpoint(tmp_path / f"resumed/checkpoints/{name}.pt")
        assert a["epoch"] == b["epoch"]
        _assert_same_state(a["model"], b["model"])
    last_a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    last_b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    assert last_a["swa"]["n_averaged"].item() == last_b["swa"]["n_averaged"].item() == 2
    _assert_same_state(last_a["swa"], last_b["swa"])

    ma = pd.read_csv(tmp_path / "full/metrics.csv").drop(columns="seconds")
    mb = pd.read_csv(tmp_path / "resumed/metrics.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ma, mb)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full/oof.csv"),
                                  pd.read_csv(tmp_path / "resumed/oof.csv"))


def test_loader_workers_do_not_draw_from_the_sampler_generator(tmp_path):
    """Starting worker processes must not consume the shuffle generator (a resumed run
    restarts its workers, so any draw there would change the resumed shuffle order)."""
    import numpy as np
    import torch

    from engine_fixtures import tiny_config
    from spinegrade.engine.loop import Settings, build_loaders

    cache = make_cache(tmp_path / "cache", n_studies=4)
    cfg = tiny_config("data.num_workers=1")
    rows = cache.index["row"].to_numpy()
    loaders = build_loaders(cfg, cache, rows[:16], rows[16:], Settings.from_config(cfg, 0))
    expected = torch.Generator()
    expected.set_state(loaders.generator.get_state())
    for _ in range(2):  # two epochs; the workers start once and persist
        seen = np.concatenate([b["row"].numpy() for b in loaders.train])
        order = torch.randperm(16, generator=expected).tolist()
        assert seen.tolist() == rows[:16][order].tolist()
    assert torch.equal(expected.get_state(), loaders.generator.get_state())
