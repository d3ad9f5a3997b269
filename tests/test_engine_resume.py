"""Interrupt training (SIGKILL, Ctrl-C), continue as told, and get the uninterrupted run."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from engine_fixtures import cli_args, make_cache
from spinegrade.engine.checkpoint import load_checkpoint
from spinegrade.engine.train import INTERRUPT_ENV, KILL_ENV


def _argv(cache, out, *extra) -> list[str]:
    return ["train", "--config", "v8", "--cache", str(cache), "--out", str(out), *cli_args(),
            *extra]


def _train(cache, out, *extra, env=None, argv=None):
    cmd = [sys.executable, "-m", "spinegrade.cli", *(argv or _argv(cache, out, *extra))]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def _interrupt_during_epoch(cache, out, epoch: int) -> subprocess.CompletedProcess:
    """Ctrl-C (SIGINT) as epoch ``epoch`` starts: the process signals itself right after the
    previous epoch's checkpoints are written (``INTERRUPT_ENV``); a signal sent from here on
    reading that epoch's line could arrive after a tiny run had already finished."""
    return _train(cache, out, env={INTERRUPT_ENV: str(epoch - 1)})


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_run(full, other) -> None:
    """Weights of every checkpoint torch.equal, SWA state, metrics.csv and oof.csv equal."""
    for name in ("last", "swa", "best"):
        a = load_checkpoint(full / f"checkpoints/{name}.pt")
        b = load_checkpoint(other / f"checkpoints/{name}.pt")
        assert a["epoch"] == b["epoch"]
        _assert_same_state(a["model"], b["model"])
    last_a = load_checkpoint(full / "checkpoints/last.pt")
    last_b = load_checkpoint(other / "checkpoints/last.pt")
    assert last_a["swa"]["n_averaged"].item() == last_b["swa"]["n_averaged"].item() == 2
    _assert_same_state(last_a["swa"], last_b["swa"])
    ma = pd.read_csv(full / "metrics.csv").drop(columns="seconds")
    mb = pd.read_csv(other / "metrics.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ma, mb)
    pd.testing.assert_frame_equal(pd.read_csv(full / "oof.csv"), pd.read_csv(other / "oof.csv"))


@pytest.mark.slow
def test_interrupted_runs_continued_as_told_equal_the_uninterrupted_one(tmp_path):
    """SIGKILL after epoch 2, then the original command line; Ctrl-C during epoch 3, then the
    command the message prints: both give the uninterrupted run exactly."""
    cache = make_cache(tmp_path / "cache").path
    full = _train(cache, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _train(cache, tmp_path / "killed", env={KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "killed/checkpoints/last.pt")["epoch"] == 2
    assert not (tmp_path / "killed/checkpoints/swa.pt").exists()
    again = _train(cache, tmp_path / "killed")  # the original command, no --resume
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "after epoch 2" in again.stderr
    _assert_same_run(tmp_path / "full", tmp_path / "killed")

    stopped = _interrupt_during_epoch(cache, tmp_path / "ctrl_c", epoch=3)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    printed = stopped.stderr.strip().splitlines()[-1].strip()
    assert printed.startswith("spinegrade train ") and printed.endswith("--resume")
    assert not (tmp_path / "ctrl_c/final.json").exists()
    resumed = _train(cache, None, argv=shlex.split(printed)[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _assert_same_run(tmp_path / "full", tmp_path / "ctrl_c")


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
