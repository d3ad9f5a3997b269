"""``prepare`` end to end: damaged inputs, naive-path equality, resume, CLI, gallery."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicom_fixtures import write_broken_file, write_series
from spinegrade.cli import main
from spinegrade.config import DataConfig, load_config
from spinegrade.constants import LEVEL_TITLES, SEVERITIES, TRAIN_COLUMNS, train_column
from spinegrade.data.cache import CropCache
from spinegrade.data.prepare import KILL_ENV, prepare
from spinegrade.data.preprocess import CropRequest
from spinegrade.data.reference import crops_from_dicom
from spinegrade.errors import UserError
from spinegrade.problems import read_problems

SPINAL = "spinal_canal_stenosis"
CFG = dataclasses.asdict(DataConfig(img_size=16, n_slices=7))


def _pixels(study: int):
    def fn(k: int, shape: tuple[int, int]) -> np.ndarray:
        rng = np.random.default_rng(study * 100 + k)
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        return (300 + 4 * xx + 2 * yy + rng.integers(0, 200, shape)).astype(np.uint16)
    return fn


def make_dataset(root: Path, n_studies: int = 6, n: int = 9, shape=(48, 48)) -> Path:
    """A tiny RSNA-layout dataset: one Sagittal T2/STIR series per study, 5 spinal labels."""
    train, coords, series = [], [], []
    for s in range(1, n_studies + 1):
        study, sid = 1000 + s, 5000 + s
        inst = list(np.random.default_rng(s).permutation(n) + 1)  # not in spatial order
        write_series(root / "train_images" / str(study) / str(sid), n=n, shape=shape,
                     instance_numbers=inst, pixel_fn=_pixels(s), window=(600, 800) if s % 2 else None)
        row = {"study_id": study}
        for li, title in enumerate(LEVEL_TITLES):
            row[train_column(SPINAL, title.lower().replace("/", "_"))] = SEVERITIES[(s + li) % 3]
            # spinal points on different instances per level (as in 433 real series)
            coords.append(f"{study},{sid},{inst[(li + s) % n]},Spinal Canal Stenosis,{title},"
                          f"{10 + 5 * li}.5,{12 + 4 * li}")
        train.append(row)
        series.append(f"{study},{sid},Sagittal T2/STIR")
    pd.DataFrame(train, columns=list(TRAIN_COLUMNS)).to_csv(root / "train.csv", index=False)
    (root / "train_label_coordinates.csv").write_text(
        "study_id,series_id,instance_number,condition,level,x,y\n" + "\n".join(coords) + "\n")
    (root / "train_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n" + "\n".join(series) + "\n")
    return root


def _series_dir(root: Path, s: int) -> Path:
    return root / "train_images" / str(1000 + s) / str(5000 + s)


def test_damaged_inputs_end_up_in_problems(tmp_path):
    root = make_dataset(tmp_path / "data")
    # 1: a truncated file; 2: an empty file; 3: a non-DICOM file; 4: a 4-slice series;
    # 5: an out-of-image point; 6: the series folder is gone.
    first = sorted(_series_dir(root, 1).glob("*.dcm"))[0]
    write_broken_file(_series_dir(root, 1) / "99.dcm", "truncated", source=first)
    write_broken_file(_series_dir(root, 2) / "98.dcm", "empty")
    write_broken_file(_series_dir(root, 3) / "notes.dcm", "text")
    shutil.rmtree(_series_dir(root, 4))
    write_series(_series_dir(root, 4), n=4, shape=(48, 48), instance_numbers=[1, 2, 3, 4])
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    coords.loc[coords["study_id"] == 1004, "instance_number"] = 2
    coords.loc[(coords["study_id"] == 1005) & (coords["level"] == "L3/L4"), "x"] = 480.0
    coords.to_csv(root / "train_label_coordinates.csv", index=False)
    shutil.rmtree(_series_dir(root, 6))

    cache = CropCache.open(prepare(root, tmp_path / "cache", CFG, workers=1, progress=False))
    problems = read_problems(cache.path / "problems.csv")
    found = {(p.study_id, p.kind, p.severity) for p in problems}
    assert (1001, "unreadable_file", "skipped") in found
    assert (1002, "unreadable_file", "skipped") in found
    assert (1003, "unreadable_file", "skipped") in found
    assert (1004, "short_series", "warning") in found
    assert (1005, "coordinate_out_of_image", "skipped") in found
    assert (1006, "missing_series", "skipped") in found
    files = {p.file for p in problems if p.kind == "unreadable_file"}
    assert {"train_images/1001/5001/99.dcm", "train_images/1002/5002/98.dcm",
            "train_images/1003/5003/notes.dcm"} <= files
    # Everything else was prepared: 6 studies x 5 levels - 1 out of image - 5 missing.
    assert len(cache) == 24 and cache.crops.shape == (24, 7, 3, 16, 16)
    assert cache.meta["counts_problems"]["missing_series"] == 5  # one per label row
    short = cache.index[cache.index["study_id"] == 1004]
    assert len(short) == 5
    crop = cache.crops[int(short["row"].iloc[0])]
    np.testing.assert_array_equal(crop[0], crop[1])  # 4 slices: edges replicated


def test_cached_crop_equals_naive_path(tmp_path):
    root = make_dataset(tmp_path / "data", n_studies=2)
    cfg = dataclasses.asdict(DataConfig(img_size=20, crop_radius_scale=0.6, n_slices=5))
    cache = CropCache.open(prepare(root, tmp_path / "cache", cfg, workers=1, progress=False))
    assert len(cache) == 10
    for r in cache.index.itertuples():
        (naive,) = crops_from_dicom(root / "train_images" / str(r.study_id) / str(r.series_id),
                                    [CropRequest(r.instance_number, r.x, r.y)], cfg)
        np.testing.assert_array_equal(cache.crops[r.row], naive)


def test_rerun_reuses_and_setting_change_makes_new_cache(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n_studies=2)
    args = ["prepare", str(root), "--out", str(tmp_path / "cache"), "--config", "demo",
            "--set", "data.img_size=24", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "samples: 10" in out and "cache: " in out
    first = CropCache.open(next((tmp_path / "cache").iterdir()))
    saved = load_config(first.path / "config.yaml")  # the resolved config is kept with the cache
    assert (saved.name, saved.data.img_size) == ("demo", 24)
    mtime = (first.path / "crops.npy").stat().st_mtime_ns
    assert main(args) == 0  # complete: reused as is
    assert (first.path / "crops.npy").stat().st_mtime_ns == mtime
    assert main(args[:-5] + ["--set", "data.img_size=48", "--no-progress"]) == 0
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(caches) == 2 and first.path.name in caches
    assert CropCache.open(tmp_path / "cache" / caches[1 - caches.index(first.path.name)]
                          ).crops.shape[-1] == 48
    assert main(["gallery", str(first.path), "--per-class", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_other_dataset_into_the_same_out_gets_its_own_cache(tmp_path):
    """A different dataset never replaces the cache earlier runs were trained on; the cache
    records which dataset made it."""
    import hashlib
    import json

    a = make_dataset(tmp_path / "a", n_studies=2)
    b = make_dataset(tmp_path / "b", n_studies=3)
    first = CropCache.open(prepare(a, tmp_path / "cache", CFG, workers=1, progress=False))
    before = {n: (first.path / n).read_bytes() for n in ("crops.npy", "index.csv", "meta.json")}
    second = CropCache.open(prepare(b, tmp_path / "cache", CFG, workers=1, progress=False))
    assert second.path != first.path and len(first) == 10 and len(second) == 15
    assert {n: (first.path / n).read_bytes() for n in before} == before  # untouched
    dataset = json.loads((second.path / "meta.json").read_text())["dataset"]
    assert dataset["data_dir"] == str(b.resolve())
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        assert dataset["csv_sha256"][name] == hashlib.sha256((b / name).read_bytes()).hexdigest()
    with pytest.raises(UserError, match="holds several caches"):  # --cache ROOT is ambiguous now
        CropCache.open(tmp_path / "cache")
    # Same CSVs, but a series folder gone: the complete cache is not rebuilt in place.
    shutil.rmtree(_series_dir(a, 2))
    with pytest.raises(UserError, match=r"another --out, or delete the folder"):
        prepare(a, tmp_path / "cache", CFG, workers=1, progress=False)
    assert {n: (first.path / n).read_bytes() for n in before} == before


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_then_rerun_equals_uninterrupted(tmp_path, workers):
    # 12 series; chunks of 3 (1 worker: 12 / 4 chunks per worker) or 2 (2 workers: 12 / 8).
    # KILL_ENV=2 SIGKILLs the CLI's process group once 2 series have reported back, i.e.
    # right after the first chunk: deterministically before consolidation.
    n_series = 12
    root = make_dataset(tmp_path / "data", n_studies=n_series, n=15, shape=(192, 192))
    cmd = [sys.executable, "-m", "spinegrade.cli", "prepare", str(root), "--no-progress",
           "--workers", str(workers), "--set", "data.img_size=64"]
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True, capture_output=True,
                   env=env)

    killed = subprocess.run(cmd + ["--out", str(tmp_path / "killed")], capture_output=True,
                            text=True, start_new_session=True, env={**env, KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (cache_dir,) = (tmp_path / "killed").iterdir()
    assert not (cache_dir / "meta.json").exists() and not (cache_dir / "crops.npy").exists()
    assert len(list(cache_dir.glob("crops.partial-*.npy"))) == 1
    markers = len(list(cache_dir.glob("shards/*.json")))
    if workers == 1:
        assert markers == 3  # in-process: exactly the first chunk
    else:  # the first chunk (2 series), maybe a second from the other worker, not all
        assert 2 <= markers < n_series

    subprocess.run(cmd + ["--out", str(tmp_path / "killed")], check=True, capture_output=True,
                   env=env)
    ref, again = (next((tmp_path / d).iterdir()) for d in ("ref", "killed"))
    assert ref.name == again.name
    for name in ("crops.npy", "index.csv", "problems.csv"):
        assert (ref / name).read_bytes() == (again / name).read_bytes(), name
    assert not (again / "shards").exists()
