"""Folds by study, stratified by each study's worst grade."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine_fixtures import make_cache, tiny_config
from spinegrade.config import DataConfig, TrainConfig
from spinegrade.engine.split import load_split, make_folds, rows_for_fold, save_split
from spinegrade.engine.train import fit
from spinegrade.errors import UserError


def _index(n_studies=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"study_id": s, "level_idx": lv, "label": int(rng.choice(3, p=[0.8, 0.12, 0.08]))}
            for s in range(n_studies) for lv in range(5)]
    df = pd.DataFrame(rows)
    df["row"] = np.arange(len(df))
    return df


def test_every_study_in_exactly_one_fold_and_rows_partitioned(tmp_path):
    index = _index()
    split = make_folds(index, n_folds=5, seed=1)
    assert split["study_id"].is_unique and len(split) == 60
    save_split(split, tmp_path)
    split = load_split(tmp_path)
    seen = []
    for k in range(5):
        train, val = rows_for_fold(index, split, k)
        assert len(np.intersect1d(train, val)) == 0
        assert len(train) + len(val) == len(index)
        val_studies = set(index.loc[val, "study_id"])
        assert not val_studies & set(index.loc[train, "study_id"])
        seen += list(val)
    assert sorted(seen) == list(range(len(index)))


def test_stratified_by_worst_grade_and_reproducible():
    index = _index(100)
    split = make_folds(index, n_folds=5, seed=3)
    counts = pd.crosstab(split["fold"], split["worst_label"])
    assert (counts.max() - counts.min()).max() <= 1
    pd.testing.assert_frame_equal(split, make_folds(index, n_folds=5, seed=3))
    assert not split["fold"].equals(make_folds(index, n_folds=5, seed=4)["fold"])


def test_bad_requests_are_user_errors():
    with pytest.raises(UserError):
        make_folds(_index(3), n_folds=5, seed=0)
    split = make_folds(_index(10), n_folds=2, seed=0)
    with pytest.raises(UserError, match="fold 2"):
        rows_for_fold(_index(10), split, 2)


def test_split_seed_alone_decides_the_folds(tmp_path):
    """train.seed changes the training, never the fold split; data.split_seed does."""
    # The default keeps the split runs had when train.seed (default 42) made it.
    assert DataConfig().split_seed == TrainConfig().seed
    cache = make_cache(tmp_path / "cache", n_studies=12)
    splits = {}
    for name, seed, split_seed in (("a", 1, 5), ("b", 2, 5)):
        cfg = tiny_config("train.epochs=1", "train.freeze_epochs=0", "train.swa=false", "train.augment=false",
                          f"train.seed={seed}", f"data.split_seed={split_seed}")
        fit(cfg, cache, tmp_path / name)
        splits[name] = load_split(tmp_path / name)
    pd.testing.assert_frame_equal(splits["a"], splits["b"])
    pd.testing.assert_frame_equal(splits["a"], make_folds(cache.index, 3, seed=5))
    assert not splits["a"]["fold"].equals(make_folds(cache.index, 3, seed=1)["fold"])
    # The seeds did train differently on the same folds.
    oof_a = pd.read_csv(tmp_path / "a/oof.csv")
    oof_b = pd.read_csv(tmp_path / "b/oof.csv")
    assert list(oof_a["row"]) == list(oof_b["row"])
    assert not np.allclose(oof_a["prob_severe"], oof_b["prob_severe"])
