"""Training on the crops prediction will see: placement jitter and predicted coordinates."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from dicom_fixtures import write_series
from spinegrade.config import ConfigError, DataConfig, load_config
from spinegrade.constants import LEVEL_TITLES, LEVELS
from spinegrade.data import jitter as J
from spinegrade.data.cache import PLACEMENT_OFF, CropCache, cache_key, check_cache_matches
from spinegrade.data.prepare import prepare
from spinegrade.data.preprocess import CropRequest, build_cropper
from spinegrade.errors import UserError
from spinegrade.io.dicom import read_series
from test_prepare import make_dataset

SPINAL = "spinal_canal_stenosis"
SMALL = dataclasses.asdict(DataConfig(img_size=16, n_slices=3))


def test_placement_defaults_are_off_and_leave_old_cache_keys_alone():
    settings = dataclasses.asdict(DataConfig())
    for key, off in PLACEMENT_OFF.items():
        assert json.loads(json.dumps(settings[key])) == off, key
    # A cache made before these settings existed has the same key as one made now.
    before = {k: v for k, v in settings.items() if k not in PLACEMENT_OFF}
    assert cache_key(settings) == cache_key(before)
    assert cache_key({**settings, "jitter_mm": 2.0}) != cache_key(settings)
    # A run trained on jittered crops is checked against any cache on pixel settings only.
    check_cache_matches({**settings, "jitter_mm": 2.0}, {**before, "preprocess_version": 2})
    with pytest.raises(UserError, match="img_size"):
        check_cache_matches({**settings, "img_size": 32}, {**before, "preprocess_version": 2})


def test_config_choices_and_bad_settings():
    assert load_config("demo", ["data.coordinates=predicted"]).data.coordinates == "predicted"
    with pytest.raises(ConfigError):
        load_config("demo", ["data.jitter_distribution=laplace"])
    for bad in ({"coordinates": "predicted"}, {"jitter_slices": [0.5, 0.5]},
                {"jitter_slices": [0.1, -0.2, 0.1]}, {"jitter_mm": -1.0}):
        with pytest.raises(UserError):
            J.check_settings({**SMALL, **bad})


def test_draws_follow_the_distribution_and_are_reproducible():
    req = CropRequest(3, 10.0, 20.0)
    normal = {"jitter_mm": 2.0, "jitter_slices": [0.1, 0.2, 0.4, 0.2, 0.1], "jitter_seed": 7}
    draws = [J.jitter_request(req, i, normal) for i in range(4000)]
    assert draws[5] == J.jitter_request(req, 5, normal)
    assert draws[5] != J.jitter_request(req, 5, {**normal, "jitter_seed": 8})
    mm = np.array([d.shift_mm for d in draws])
    np.testing.assert_allclose(mm.mean(axis=0), 0.0, atol=0.1)
    np.testing.assert_allclose(mm.std(axis=0), 2.0, rtol=0.05)
    freq = np.bincount([d.slice_offset + 2 for d in draws], minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.4, 0.2, 0.1], atol=0.025)
    uniform = [J.jitter_request(req, i, {"jitter_px": 3.0, "jitter_distribution": "uniform"})
               for i in range(2000)]
    px = np.array([d.shift_px for d in uniform])
    assert np.abs(px).max() <= 3.0 and np.abs(px).max() > 2.9
    np.testing.assert_allclose(px.std(axis=0), 3.0 / np.sqrt(3.0), rtol=0.06)
    assert J.jitter_requests([req], [0], SMALL) == (req,)


def test_cropper_moves_the_centre_by_the_placement_error(tmp_path):
    """A shifted request cuts the crop of the shifted point; a slice offset the crop of the
    spatial neighbour (instance numbers run backwards here)."""
    write_series(tmp_path / "s", n=7, shape=(64, 64), pixel_spacing=(0.5, 0.25),
                 order="reversed")
    vol = read_series(tmp_path / "s")
    cropper = build_cropper(DataConfig(img_size=16, n_slices=3, window_preset="percentile"))
    inst = [int(i) for i in vol.instance_numbers]  # spatial order
    c = 3
    base = CropRequest(inst[c], 30.0, 25.0)
    shifted = dataclasses.replace(base, shift_mm=(1.0, -1.0), shift_px=(2.0, 0.0))
    # 1 mm / 0.25 mm columns = 4 px in x, plus 2 px; -1 mm / 0.5 mm rows = -2 px in y.
    plan = cropper.slice_plan(vol, shifted)
    assert plan[1][:3] == (c, 36.0, 23.0)
    got, want = cropper(vol, [shifted, CropRequest(inst[c], 36.0, 23.0)])
    np.testing.assert_array_equal(got, want)
    up = dataclasses.replace(base, slice_offset=1)
    assert [p[0] for p in cropper.slice_plan(vol, up)] == [c, c + 1, c + 2]
    got, want = cropper(vol, [up, CropRequest(inst[c + 1], 30.0, 25.0)])
    np.testing.assert_array_equal(got, want)
    edge = dataclasses.replace(base, slice_offset=9, shift_px=(500.0, -500.0))
    assert cropper.slice_plan(vol, edge)[1][:3] == (6, 63.0, 0.0)  # clipped to the image
    assert cropper.slice_plan(vol, base)[1][:3] == (c, 30.0, 25.0)


def test_prepare_on_predicted_coordinates_and_with_jitter(tmp_path):
    data = make_dataset(tmp_path / "data", n_studies=4)
    labels = pd.read_csv(data / "train_label_coordinates.csv")
    plain = CropCache.open(prepare(data, tmp_path / "c0", SMALL, progress=False))

    # predict's locations.csv format: column-form names, a score, one refused point.
    pred = labels.copy()
    pred["x"] += 3.0
    pred["condition"] = SPINAL
    pred["level"] = [LEVELS[LEVEL_TITLES.index(v)] for v in labels["level"]]
    pred["score"], pred["refused"] = 0.9, ""
    pred.loc[0, "refused"] = "discs not plausible: ..."
    csv = tmp_path / "locations.csv"
    pred.to_csv(csv, index=False)
    settings = {**SMALL, "coordinates": "predicted", "coordinates_csv": str(csv)}
    moved = CropCache.open(prepare(data, tmp_path / "c1", settings, progress=False))
    assert len(moved.index) == len(plain.index) - 1
    first = labels.iloc[0]
    assert not ((moved.index.study_id == first.study_id)
                & (moved.index.level == LEVELS[LEVEL_TITLES.index(first.level)])).any()
    merged = moved.index.merge(plain.index, on=["study_id", "level"], suffixes=("", "_lab"))
    np.testing.assert_allclose(merged["x"], merged["x_lab"] + 3.0)
    np.testing.assert_array_equal(merged["label"], merged["label_lab"])
    problems = pd.read_csv(moved.path / "problems.csv")
    assert "no_coordinates" in set(problems["kind"])

    jit = {**SMALL, "jitter_px": 4.0, "jitter_slices": [0.25, 0.5, 0.25], "jitter_seed": 3}
    a = CropCache.open(prepare(data, tmp_path / "c2", jit, progress=False))
    b = CropCache.open(prepare(data, tmp_path / "c3", jit, progress=False, workers=2))
    np.testing.assert_array_equal(np.asarray(a.crops), np.asarray(b.crops))
    differs = [not np.array_equal(a.crops[i], plain.crops[i]) for i in range(len(a.index))]
    assert a.path.name != plain.path.name and np.mean(differs) > 0.8
