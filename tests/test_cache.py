"""The crop store, its key and the Dataset over it (no DICOM needed)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from spinegrade.config import DataConfig, config_from_dict, load_config
from spinegrade.data.cache import (
    CropCache,
    cache_key,
    check_cache_matches,
    pixel_config,
    resolve_cache_dir,
)
from spinegrade.data.dataset import CropDataset
from spinegrade.errors import UserError


def _tiny(tmp_path, n=6):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (n, 7, 3, 8, 8), dtype=np.uint8)
    index = pd.DataFrame({"study_id": np.arange(n) // 2 + 100, "series_id": 7,
                          "instance_number": 3, "x": 1.5, "y": 2.5, "level": "l1_l2",
                          "level_idx": np.arange(n) % 5, "label": np.arange(n) % 3})
    cfg = dataclasses.asdict(DataConfig(img_size=8))
    return crops, index, CropCache.create(tmp_path / "c", crops, index, cfg)


def test_create_open_round_trip(tmp_path):
    crops, index, cache = _tiny(tmp_path)
    again = CropCache.open(tmp_path / "c")
    assert isinstance(again.crops, np.memmap) and again.crops.dtype == np.uint8
    np.testing.assert_array_equal(again.crops, crops)
    assert again.index["row"].tolist() == list(range(6))
    assert again.index["study_id"].tolist() == index["study_id"].tolist()
    assert again.data_cfg["img_size"] == 8
    assert again.meta["counts"]["per_class"] == {"normal_mild": 2, "moderate": 2, "severe": 2}
    # The recorded settings give back the config section they came from.
    assert config_from_dict({"data": again.data_cfg}).data == DataConfig(img_size=8)
    assert resolve_cache_dir(tmp_path) == tmp_path / "c"  # the single cache under a root


def test_create_rejects_bad_arrays(tmp_path):
    index = pd.DataFrame({"study_id": [1], "level_idx": [0], "label": [0]})
    with pytest.raises(ValueError, match="uint8"):
        CropCache.create(tmp_path / "c", np.zeros((1, 7, 3, 4, 4), np.float32), index, {})
    with pytest.raises(ValueError, match="index rows"):
        CropCache.create(tmp_path / "c", np.zeros((2, 7, 3, 4, 4), np.uint8), index, {})
    with pytest.raises(UserError, match="prepare"):
        CropCache.open(tmp_path / "nothing")


def test_dataset_items(tmp_path):
    crops, index, cache = _tiny(tmp_path)
    ds = CropDataset(cache, rows=[4, 1])
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (7, 3, 8, 8)
    assert torch.equal(item["image"], torch.from_numpy(crops[4]))
    assert [item[k].dtype for k in ("level", "label", "row", "study_id")] == [torch.int64] * 4
    assert (int(item["level"]), int(item["label"]), int(item["row"]), int(item["study_id"])) == (
        4, 1, 4, 102)
    # Pickled by path (DataLoader workers), not by copying the memmap.
    assert len(pickle.dumps(ds)) < crops.nbytes
    assert torch.equal(pickle.loads(pickle.dumps(ds))[1]["image"], torch.from_numpy(crops[1]))
    batch = next(iter(torch.utils.data.DataLoader(CropDataset(cache), batch_size=3)))
    assert batch["image"].shape == (3, 7, 3, 8, 8)
    with pytest.raises(IndexError):
        CropDataset(cache, rows=[6])


def _key(data_cfg: DataConfig) -> str:
    return cache_key(dataclasses.asdict(data_cfg))


def test_cache_key_follows_pixel_settings():
    base = load_config("v8").data
    assert _key(base).startswith("spinal_canal_stenosis-")
    assert _key(dataclasses.replace(base, fold=3, num_workers=9)) == _key(base)
    changed = load_config("v8", ["data.img_size=48"]).data
    assert _key(changed) != _key(base)
    assert _key(dataclasses.replace(base, window_preset="percentile")) != _key(base)
    other = dataclasses.replace(base, condition="left_neural_foraminal_narrowing")
    assert _key(other).startswith("left_neural_foraminal_narrowing-")


def test_cache_from_older_preprocessing_code_is_refused(tmp_path):
    """A cache whose pixel_config names another preprocessing version is never reused."""
    settings = dataclasses.asdict(DataConfig(img_size=32))
    current = pixel_config(settings)
    check_cache_matches(settings, current)  # same settings and code: accepted
    old = json.loads(json.dumps(current))
    old["preprocess_version"] = current["preprocess_version"] - 1
    with pytest.raises(UserError, match="preprocess_version"):
        check_cache_matches(settings, old)
    with pytest.raises(UserError, match=r"data\.img_size: cache has 32, config has 48"):
        check_cache_matches(dataclasses.asdict(DataConfig(img_size=48)), current)
