"""The crop cache store: folder layout, cache key, writing from arrays, opening for reading.

Layout of one cache (``prepare`` puts it in ``OUT/<condition>-<hash8>/``, the hash covering
every pixel-affecting setting, so a changed setting never reuses stale crops)::

    crops.npy      uint8 (N, n_slices, 3, S, S), opened with np.load(mmap_mode="r")
    index.csv      one row per crop: the build_index columns + ``row`` (position in crops)
    problems.csv   every file or row skipped or kept with a warning, and why
    meta.json      data_cfg, cache key, versions, counts; written last (= the cache is complete)

The settings are a plain dict with the field names of the config's ``data`` section
(``dataclasses.asdict(cfg.data)`` on the engine/CLI side). How a cache is built, in parallel
and resumably, is ``data.prepare``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pydicom

from spinegrade import __version__
from spinegrade.constants import (
    CLASS_NAMES,
    COORDINATES_CSV,
    LEVELS,
    TRAIN_CSV,
    series_descriptions_csv,
)
from spinegrade.data.preprocess import PREPROCESS_VERSION
from spinegrade.data.rsna import LABELLED_SPLIT
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path, atomic_write_text
from spinegrade.problems import PROBLEMS_FILE, read_problems

FORMAT_VERSION = 1
CROPS_FILE = "crops.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
# Settings that do not change a crop's pixels; every other key (including ones added to the
# config later) is part of the cache key, so a new setting errs on the side of a rebuild.
NON_PIXEL_FIELDS: frozenset[str] = frozenset({"folds", "fold", "split_seed", "num_workers"})
# Where the crops are centred (data.jitter), not how a crop is made, with their "off"
# values: part of the key only when set (so caches made before they existed keep their
# keys), and never compared by check_cache_matches (a run trained on jittered or
# predicted-coordinate crops is evaluated on any cache, and predicts with plain crops).
PLACEMENT_OFF: dict[str, Any] = {
    "coordinates": "labels", "coordinates_csv": "", "jitter_mm": 0.0, "jitter_px": 0.0,
    "jitter_distribution": "normal", "jitter_slices": [], "jitter_seed": 0,
}


# --- cache key ---------------------------------------------------------------------------------


def pixel_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that affect crops, plus the preprocessing code version.

    Args:
        settings: the data settings (``dataclasses.asdict(cfg.data)``, or a cache's
            ``data_cfg``).
    """
    out = {k: v for k, v in sorted(settings.items()) if k not in NON_PIXEL_FIELDS}
    out["preprocess_version"] = PREPROCESS_VERSION
    out = json.loads(json.dumps(out))  # tuples -> lists, so dicts from JSON compare equal
    return {k: v for k, v in out.items() if k not in PLACEMENT_OFF or v != PLACEMENT_OFF[k]}


def cache_key(settings: Mapping[str, Any], dataset: str = "") -> str:
    """``<condition>-<hash8>``: the folder name of the cache for these settings.

    Args:
        settings: the data settings.
        dataset: the dataset fingerprint (``data.cache.dataset_fingerprint``); a different
            dataset prepared into the same root gets its own folder, never replacing the
            cache that earlier runs were trained on.
    """
    key: dict[str, Any] = {"pixels": pixel_config(settings)} if dataset else pixel_config(settings)
    if dataset:
        key["dataset"] = dataset
    blob = json.dumps(key, sort_keys=True).encode()
    return f"{settings['condition']}-{hashlib.sha256(blob).hexdigest()[:8]}"


def dataset_fingerprint(data_dir: str | Path) -> dict[str, Any]:
    """Which dataset a cache was made from: its folder and a hash of each label CSV.

    Returns:
        ``data_dir`` (absolute), ``csv_sha256`` (file name -> sha256 of its bytes, or None
        when absent) and ``fingerprint`` (16 hex digits over the hashes: the folder may move,
        the labels may not change).
    """
    data_dir = Path(data_dir)
    hashes = {}
    for name in (TRAIN_CSV, COORDINATES_CSV, series_descriptions_csv(LABELLED_SPLIT)):
        path = data_dir / name
        hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    blob = json.dumps(hashes, sort_keys=True).encode()
    return {"data_dir": str(data_dir.resolve()), "csv_sha256": hashes,
            "fingerprint": hashlib.sha256(blob).hexdigest()[:16]}


def index_fingerprint(index: pd.DataFrame) -> str:
    """Hash of an index frame: a complete cache is reused only for the same samples."""
    blob = index.to_csv(index=False, float_format="%.6g").encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_current_cache(cache_dir: Path, fingerprint: str) -> bool:
    """Whether ``cache_dir`` holds a complete cache of the index with this ``fingerprint``.

    Raises:
        UserError: it holds a complete cache of other samples: never rebuilt in place, as
            runs trained on it would silently change.
    """
    meta_path = cache_dir / META_FILE
    if not (meta_path.is_file() and (cache_dir / CROPS_FILE).is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("index_fingerprint") == fingerprint:
        return True
    raise UserError(
        f"{cache_dir} is a complete cache of {meta.get('data_dir', 'another dataset')} built "
        f"from other samples (index fingerprint {meta.get('index_fingerprint')} != "
        f"{fingerprint}: series folders added or removed?). Runs trained on it would no "
        "longer match it. Prepare into another --out, or delete the folder to rebuild it.")


def check_cache_matches(settings: Mapping[str, Any], cached: dict) -> None:
    """Raise ``UserError`` when a cache was made with other pixel settings than ``settings``.

    Only keys the cache recorded are compared, so caches written by ``CropCache.create``
    with partial settings are accepted.
    """
    want = {k: v for k, v in pixel_config(settings).items() if k not in PLACEMENT_OFF}
    have = {k: v for k, v in json.loads(json.dumps(cached)).items() if k in want}
    diffs = [f"data.{k}: cache has {have[k]!r}, config has {want[k]!r}"
             for k in sorted(have) if have[k] != want[k]]
    if diffs:
        raise UserError(
            "the crop cache was prepared with other settings than this config:\n  "
            + "\n  ".join(diffs)
            + "\nRun 'spinegrade prepare' with this config, or pass the cache's values with --set.")


# --- the store ---------------------------------------------------------------------------------


@dataclass
class CropCache:
    """A prepared cache opened for reading: index, memory-mapped crops, config.

    Attributes:
        path: the cache folder.
        index: one row per crop (``row`` = position in ``crops``).
        crops: uint8 memmap ``(N, n_slices, 3, S, S)``.
        data_cfg: the preprocessing config that made it (plain dict).
        meta: the whole ``meta.json``.
    """

    path: Path
    index: pd.DataFrame
    crops: np.ndarray
    data_cfg: dict
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> CropCache:
        """Open a cache folder, or an ``OUT`` folder holding exactly one cache.

        Raises:
            UserError: not a complete cache (no ``meta.json``), or several to choose from.
        """
        path = resolve_cache_dir(path)
        meta = json.loads((path / META_FILE).read_text())
        index = pd.read_csv(path / INDEX_FILE)
        crops = np.load(path / CROPS_FILE, mmap_mode="r")
        if len(index) != len(crops):
            raise UserError(f"{path}: index.csv has {len(index)} rows but crops.npy "
                            f"{len(crops)}; delete the folder and run prepare again")
        return cls(path, index, crops, meta["data_cfg"], meta)

    @classmethod
    def create(cls, path: str | Path, crops: np.ndarray, index_df: pd.DataFrame,
               data_cfg_dict: dict, extra_meta: dict | None = None) -> CropCache:
        """Write a cache from arrays (tests, tools) and open it.

        Args:
            path: the cache folder to write (created).
            crops: uint8 ``(N, n_slices, 3, S, S)``.
            index_df: N rows, at least ``study_id, level_idx, label``; ``row`` is set to
                ``0..N-1`` (replaced if present).
            data_cfg_dict: the settings to record (``dataclasses.asdict(cfg.data)``, or any
                dict).
            extra_meta: more keys for ``meta.json``.
        """
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim != 5 or crops.shape[2] != 3:
            raise ValueError(f"crops must be uint8 (N, S, 3, H, W), got {crops.dtype} {crops.shape}")
        if len(index_df) != len(crops):
            raise ValueError(f"{len(index_df)} index rows for {len(crops)} crops")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        index_df = index_df.reset_index(drop=True).copy()
        index_df["row"] = np.arange(len(index_df), dtype=np.int64)  # always the position
        with atomic_path(path / CROPS_FILE, suffix=".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(crops))
        write_index(path / INDEX_FILE, index_df)
        meta = cache_meta(data_cfg_dict, index_df, crops.shape, extra_meta or {})
        atomic_write_text(path / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        return cls.open(path)

    @property
    def fingerprint(self) -> str:
        """What a run trained on this cache records (``run.json``) to notice a changed cache:
        a hash of index.csv (samples, labels, rows), the pixel settings and the crops' shape."""
        h = hashlib.sha256((self.path / INDEX_FILE).read_bytes())
        h.update(json.dumps([pixel_config(self.data_cfg), list(self.crops.shape)],
                            sort_keys=True).encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.index)

    def __reduce__(self) -> tuple:
        # Pickle by path (DataLoader workers, spawn): a memmap would otherwise be copied whole.
        return (CropCache.open, (str(self.path),))


def resolve_cache_dir(path: str | Path) -> Path:
    """The cache folder itself, or the single cache inside an ``OUT`` folder."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.glob(f"*/{META_FILE}")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{path} holds several caches ({names}); pass one of them")
    raise UserError(f"{path}: not a prepared crop cache (no {META_FILE}); run "
                    "'spinegrade prepare DATA_DIR --out CACHE' first (an interrupted run "
                    "resumes when run again)")


def find_cache(root: str | Path, settings: Mapping[str, Any]) -> Path | None:
    """The complete cache under ``root`` that ``prepare`` made for ``settings``, when one is
    there: its folder name is the key of these settings and the dataset its meta.json names
    (or of the settings alone: caches made before the dataset was part of the key).

    Raises:
        UserError: several datasets were prepared into ``root`` with these settings.
    """
    found = []
    for meta_path in sorted(Path(root).glob(f"*/{META_FILE}")):
        try:
            dataset = json.loads(meta_path.read_text()).get("dataset") or {}
        except (ValueError, AttributeError):
            continue  # not a cache's meta.json; resolve_cache_dir names what is wrong
        name = meta_path.parent.name
        if name == cache_key(settings, str(dataset.get("fingerprint", ""))):
            found.append(meta_path.parent)
    if len(found) > 1:
        raise UserError(f"{root} holds caches of these settings from several datasets "
                        f"({', '.join(p.name for p in found)}); pass the one to use, or --data")
    return found[0] if found else None


def write_index(path: Path, index_df: pd.DataFrame) -> None:
    """Write ``index.csv`` atomically (the one format both writers use)."""
    with atomic_path(path, suffix=".csv") as tmp:
        index_df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def cache_meta(data_cfg: Mapping[str, Any], index_df: pd.DataFrame, shape: Sequence[int],
               extra: dict) -> dict:
    """The ``meta.json`` content of a cache: settings, key, shape, counts, versions, ``extra``."""
    counts: dict[str, Any] = {"samples": int(len(index_df))}
    if "label" in index_df.columns:
        counts["per_class"] = {CLASS_NAMES[k]: int((index_df["label"] == k).sum())
                               for k in range(len(CLASS_NAMES))}
    if "level_idx" in index_df.columns:
        counts["per_level"] = {LEVELS[k]: int((index_df["level_idx"] == k).sum())
                               for k in range(len(LEVELS))}
    meta = {
        "format_version": FORMAT_VERSION,
        "data_cfg": json.loads(json.dumps(dict(data_cfg))),
        "pixel_config": pixel_config(data_cfg),
        "crops_shape": [int(s) for s in shape],
        "counts": counts,
        "versions": {"spinegrade": __version__, "numpy": np.__version__,
                     "opencv": cv2.__version__, "pydicom": pydicom.__version__,
                     "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta.update(extra)
    return meta


def summarize(cache_dir: str | Path) -> str:
    """A few lines for the end of ``prepare``: samples per class, problems by kind, location."""
    cache = CropCache.open(cache_dir)
    counts = cache.meta.get("counts", {})
    classes = counts.get("per_class", {})
    per_class = ", ".join(f"{k} {classes[k]}" for k in CLASS_NAMES if k in classes)
    lines = [f"cache: {cache.path}",
             f"samples: {len(cache)} ({per_class}); crops {tuple(cache.crops.shape)} uint8"]
    problems_path = cache.path / PROBLEMS_FILE
    problems = read_problems(problems_path) if problems_path.is_file() else []
    by_kind = Counter((p.kind, p.severity) for p in problems)
    if by_kind:
        lines.append(f"problems ({len(problems)}, listed in {problems_path}):")
        lines += [f"  {kind:<28} {sev:<8} {n}" for (kind, sev), n in sorted(by_kind.items())]
    else:
        lines.append("problems: none")
    return "\n".join(lines)
