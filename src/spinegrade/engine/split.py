"""Cross-validation folds by study, stratified by each study's worst grade."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from spinegrade.engine.run_folder import RunFolder
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path


def make_folds(index: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Assign every study to one of ``n_folds`` folds.

    All rows of a study land in the same fold (no study is ever in two folds); studies are
    stratified by their worst label so each fold gets its share of Severe studies.

    Args:
        index: cache index with at least ``study_id`` and ``label`` columns.
        n_folds: number of folds (>= 2).
        seed: shuffling seed.

    Returns:
        One row per study: ``study_id``, ``worst_label``, ``fold`` (0-based), sorted by study.
    """
    if n_folds < 2:
        raise UserError(f"data.folds must be at least 2, got {n_folds}")
    studies = (index.groupby("study_id", sort=True)["label"].max().rename("worst_label")
               .reset_index())
    if len(studies) < n_folds:
        raise UserError(f"{len(studies)} studies cannot fill {n_folds} folds; "
                        "lower data.folds or use a larger cache")
    folds = np.zeros(len(studies), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A grade rarer than n_folds studies is spread as well as it can be; that is fine.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, val_idx) in enumerate(splitter.split(studies, studies["worst_label"])):
            folds[val_idx] = k
    studies["fold"] = folds
    return studies


def holdout_split(study_ids: Iterable[int], val_fraction: float, seed: int) -> pd.DataFrame:
    """Hold out ``val_fraction`` of the studies (at least one when there are two or more).

    The localizer's split: one row per study, ``study_id`` and ``split`` ("train" / "val").
    """
    ids = np.array(sorted({int(s) for s in study_ids}), dtype=np.int64)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    perm = np.random.default_rng(seed).permutation(len(ids))
    split = np.full(len(ids), "train", dtype=object)
    split[perm[:n_val]] = "val"
    return pd.DataFrame({"study_id": ids, "split": split})


def rows_for_fold(index: pd.DataFrame, split: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Cache rows (the index's ``row`` column) of the training and validation studies of ``fold``."""
    n_folds = int(split["fold"].max()) + 1
    if not 0 <= fold < n_folds:
        raise UserError(f"fold {fold} does not exist; the split has folds 0..{n_folds - 1}")
    # Compare as text: a split read back from CSV may type study ids differently.
    val_studies = set(split.loc[split["fold"] == fold, "study_id"].astype(str))
    is_val = index["study_id"].astype(str).isin(val_studies).to_numpy()
    rows = index["row"].to_numpy()
    return np.sort(rows[~is_val]), np.sort(rows[is_val])


def save_split(split: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write ``split.csv`` atomically into ``out_dir``."""
    path = RunFolder(out_dir).split
    with atomic_path(path, suffix=".csv") as tmp:
        split.to_csv(tmp, index=False)
    return path


def load_split(run_dir: str | Path) -> pd.DataFrame:
    """Read a run's ``split.csv``."""
    path = RunFolder(run_dir).split
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a training run folder?")
    return pd.read_csv(path)
