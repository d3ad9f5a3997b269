"""Two-process torchrun (gloo, CPU): validation metrics equal a single-process re-evaluation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine_fixtures import cli_args, make_cache
from spinegrade.engine.split import load_split, rows_for_fold

# Learning rates high enough that the tiny model predicts more than one class.
FAST = ("train.frozen_head_lr=3e-3", "train.head_lr=3e-3", "train.backbone_lr=1e-3",
        "train.epochs=3", "train.swa_start_epoch=3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_two_process_gloo_metrics_equal_single_process_evaluation(tmp_path):
    # 9 studies over 3 folds: 3 validation studies, 15 samples (odd), so a
    # padding sampler would duplicate one; ours must not.
    cache = make_cache(tmp_path / "cache", n_studies=9).path
    run = tmp_path / "run"
    cmd = [*_torchrun(), "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "spinegrade.cli", "train", "--config", "v8", "--cache", str(cache),
           "--out", str(run), *cli_args(*FAST)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2

    from spinegrade.data.cache import CropCache

    index = CropCache.open(cache).index
    _, val_rows = rows_for_fold(index, load_split(run), 0)
    assert len(val_rows) % 2 == 1
    oof = pd.read_csv(run / "oof.csv")
    assert sorted(oof["row"]) == sorted(val_rows)  # every row once, no padding duplicate

    ev = subprocess.run([sys.executable, "-m", "spinegrade.cli", "evaluate", str(run),
                         "--checkpoint", "last", "--no-tta", "--no-calibration",
                         "--out", str(tmp_path / "ev")],
                        capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    single = json.loads((tmp_path / "ev/metrics.json").read_text())
    last = pd.read_csv(run / "metrics.csv").iloc[-1]
    assert single["n_samples"] == last["n_val"] == len(val_rows)
    assert json.loads(last["confusion_matrix"]) == single["confusion_matrix"]
    assert last["balanced_accuracy"] == pytest.approx(single["balanced_accuracy"], abs=1e-12)
    for c, r in single["recall"].items():
        assert last[f"recall_{c}"] == pytest.approx(r, abs=1e-12)
    assert last["weighted_logloss"] == pytest.approx(single["weighted_logloss"], abs=1e-5)
    assert np.isfinite(last["val_loss"])
