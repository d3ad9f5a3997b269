"""The crop cache: DICOM series -> memory-mappable uint8 crops + index + problems.

Layout of one cache (``prepare`` puts it in ``OUT/<condition>-<hash8>/``, the hash covering
every pixel-affecting DataConfig field, so a changed setting never reuses stale crops)::

    crops.npy      uint8 (N, n_slices, 3, S, S), opened with np.load(mmap_mode="r")
    index.csv      one row per crop: the build_index columns + ``row`` (position in crops)
    problems.csv   every file or row skipped or kept with a warning, and why
    meta.json      data_cfg, cache key, versions, counts; written last (= the cache is complete)

While preparing, the folder also holds ``crops.partial-<index hash>.npy`` (preallocated, one
row per index row) and ``shards/<study>_<series>.json`` markers. Each series is read once
(every file parsed once, only the slices some crop needs decoded), each such slice is
windowed and equalised once, and all of the series' crops are written into their rows of
the partial store. Series run in chunks of a few: the chunk's rows are synced to disk, and
only then are its series' markers written (atomically). A rerun after an interruption (Ctrl-C, kill -9) skips series
whose marker exists and matches their task, and redoes the others. At the end the partial
store is renamed to ``crops.npy`` (or, when some samples failed, its good rows are copied),
after ``index.csv`` and ``problems.csv`` and before ``meta.json``; markers are removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinegrade import __version__
from spinegrade.config import DataConfig, config_from_dict
from spinegrade.constants import CLASS_NAMES, LEVELS
from spinegrade.data.preprocess import PREPROCESS_VERSION, CropRequest, build_cropper
from spinegrade.data.rsna import (
    IMAGES_DIR,
    Problem,
    build_index,
    read_problems,
    write_problems,
)
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CROPS_FILE = "crops.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
PROBLEMS_FILE = "problems.csv"
SHARDS_DIR = "shards"
# DataConfig fields that do not change a crop's pixels; every other field (including ones
# added later) is part of the cache key, so a new setting errs on the side of a rebuild.
NON_PIXEL_FIELDS: frozenset[str] = frozenset({"folds", "fold", "num_workers"})
# Test hook: once N series' markers are written (counted as their chunks report back), the
# preparing process SIGKILLs its process group when it leads one (itself and its workers,
# like ``kill -9`` of the group), else itself.
KILL_ENV = "SPINEGRADE_KILL_AFTER_SHARDS"


# --- cache key ---------------------------------------------------------------------------------


def pixel_config(data_cfg: DataConfig | dict) -> dict[str, Any]:
    """The DataConfig fields that affect crops, plus the preprocessing code version."""
    d = dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else dict(data_cfg)
    out = {k: v for k, v in sorted(d.items()) if k not in NON_PIXEL_FIELDS}
    out["preprocess_version"] = PREPROCESS_VERSION
    return json.loads(json.dumps(out))  # tuples -> lists, so dicts from JSON compare equal


def cache_key(data_cfg: DataConfig) -> str:
    """``<condition>-<hash8>``: the folder name of the cache for this config."""
    blob = json.dumps(pixel_config(data_cfg), sort_keys=True).encode()
    return f"{data_cfg.condition}-{hashlib.sha256(blob).hexdigest()[:8]}"


def check_cache_matches(data_cfg: DataConfig, cached: dict) -> None:
    """Raise ``UserError`` when a cache was made with other pixel settings than ``data_cfg``.

    Only keys the cache recorded are compared, so caches written by ``CropCache.create``
    with a partial config are accepted.
    """
    want = pixel_config(data_cfg)
    have = {k: v for k, v in json.loads(json.dumps(cached)).items() if k in want}
    diffs = [f"data.{k}: cache has {have[k]!r}, config has {want[k]!r}"
             for k in sorted(have) if have[k] != want[k]]
    if diffs:
        raise UserError(
            "the crop cache was prepared with other settings than this config:\n  "
            + "\n  ".join(diffs)
            + "\nRun 'spinegrade prepare' with this config, or pass the cache's values with --set.")


def data_config_from_dict(d: dict) -> DataConfig:
    """A DataConfig from a stored dict, ignoring keys this version does not know."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    return config_from_dict({"data": {k: v for k, v in d.items() if k in known}}).data


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
            data_cfg_dict: the preprocessing config to record (``dataclasses.asdict`` of a
                DataConfig, or any dict).
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
        _write_index(path / INDEX_FILE, index_df)
        meta = _meta(data_cfg_dict, index_df, crops.shape, extra_meta or {})
        atomic_write_text(path / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        return cls.open(path)

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


def _write_index(path: Path, index_df: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        index_df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def _meta(data_cfg: dict, index_df: pd.DataFrame, shape: Sequence[int], extra: dict) -> dict:
    import cv2
    import pydicom

    counts: dict[str, Any] = {"samples": int(len(index_df))}
    if "label" in index_df.columns:
        counts["per_class"] = {CLASS_NAMES[k]: int((index_df["label"] == k).sum())
                               for k in range(len(CLASS_NAMES))}
    if "level_idx" in index_df.columns:
        counts["per_level"] = {LEVELS[k]: int((index_df["level_idx"] == k).sum())
                               for k in range(len(LEVELS))}
    meta = {
        "format_version": FORMAT_VERSION,
        "data_cfg": json.loads(json.dumps(data_cfg)),
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


# --- one series -> one shard (runs in worker processes) ---------------------------------------


@dataclass(frozen=True)
class SeriesTask:
    """All crops to cut from one series, and where the shard goes."""

    data_dir: str
    study_id: int
    series_id: int
    sample_ids: tuple[int, ...]           # positions in the build_index frame
    requests: tuple[CropRequest, ...]
    shard: str                            # marker: shards/<study>_<series>.json
    crops_file: str                       # the partial store, rows = sample ids

    @property
    def fingerprint(self) -> str:
        """Hash of what this task asks for: a shard from a different task is not reused."""
        blob = json.dumps([self.study_id, self.series_id, list(self.sample_ids),
                           [dataclasses.astuple(r) for r in self.requests]])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def series_dir(self) -> Path:
        return Path(self.data_dir) / IMAGES_DIR / str(self.study_id) / str(self.series_id)


_CROPPERS: dict[str, Any] = {}


def _cropper(data_cfg: DataConfig) -> Any:
    key = json.dumps(dataclasses.asdict(data_cfg), sort_keys=True)
    if key not in _CROPPERS:
        _CROPPERS[key] = build_cropper(data_cfg)
    return _CROPPERS[key]


def _relative(path: str | Path, root: str | Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _reader_problems(task: SeriesTask, volume: Any) -> list[Problem]:
    """The reader's (file, reason) notes as Problems: unused files skipped, the rest warnings."""
    used = {str(f) for f in getattr(volume, "files", [])}
    out = []
    for file, reason in volume.problems:
        skipped = file != str(task.series_dir) and file not in used
        kind = "unreadable_file" if skipped else "series_warning"
        out.append(Problem(task.study_id, task.series_id, _relative(file, task.data_dir), -1,
                           kind, "skipped" if skipped else "warning", reason))
    return out


def process_series(task: SeriesTask, data_cfg: DataConfig) -> tuple[list[int], np.ndarray,
                                                                      list[Problem]]:
    """Read one series once and cut all its crops (see ``_series_crops``).

    Returns:
        ``(sample_ids, crops, problems)`` for the samples that succeeded, crops stacked as
        ``(n, n_slices, 3, S, S)``; a series that cannot be read gives no crops and a
        problem, never an exception.
    """
    ids, crops, problems = _series_crops(task, data_cfg)
    size = data_cfg.img_size
    stacked = (np.stack(crops) if crops
               else np.zeros((0, data_cfg.n_slices, 3, size, size), dtype=np.uint8))
    return ids, stacked, problems


def _series_crops(task: SeriesTask, data_cfg: DataConfig) -> tuple[list[int], list[np.ndarray],
                                                                     list[Problem]]:
    """Read one series once and cut all its crops, one array per successful sample.

    Every file is parsed once, but only the slices some crop needs are decoded (windows and
    CLAHE likewise run once per needed slice). A used slice that fails to decode makes the
    series be read again eagerly, which drops that file from the stack exactly as before.

    Returns:
        ``(sample_ids, crops, problems)`` for the samples that succeeded; a series that cannot
        be read gives no crops and a problem, never an exception.
    """
    from spinegrade.io.dicom import PixelDecodeError, read_series

    n_slices = data_cfg.n_slices
    empty: list[np.ndarray] = []
    rel_dir = _relative(task.series_dir, task.data_dir)
    wanted = [r.instance_number for r in task.requests]

    def fail(kind: str, message: str) -> tuple[list[int], list[np.ndarray], list[Problem]]:
        return [], empty, [Problem(task.study_id, task.series_id, rel_dir, -1, kind, "skipped",
                                   message)]

    cropper = _cropper(data_cfg)
    try:
        volume = read_series(task.series_dir, wanted, lazy_pixels=True)
    except Exception as e:  # a damaged series must never stop the run
        return fail("unreadable_series", f"{type(e).__name__}: {e}")
    try:
        results = cropper(volume, task.requests)
    except PixelDecodeError:  # rare: let the eager reader drop and report the file
        try:
            volume = read_series(task.series_dir, wanted)
        except Exception as e:  # same reason as above
            return fail("unreadable_series", f"{type(e).__name__}: {e}")
        results = None
    except Exception:  # reported below, with the reader's problems
        results = None
    problems = _reader_problems(task, volume)
    if len(volume.slices) < n_slices:
        problems.append(Problem(task.study_id, task.series_id, rel_dir, -1, "short_series",
                                "warning", f"{len(volume.slices)} slices < n_slices={n_slices}; "
                                "edge slices replicated"))
    try:
        if results is None:
            results = cropper(volume, task.requests)
    except Exception as e:  # e.g. geometry a crop cannot use; skip the series, keep going
        return [], empty, problems + fail("crop_failed", f"{type(e).__name__}: {e}")[2]
    ids, crops = [], []
    for sid, req, res in zip(task.sample_ids, task.requests, results, strict=True):
        if isinstance(res, np.ndarray):
            ids.append(sid)
            crops.append(res)
            continue
        kind = "missing_instance" if isinstance(res, KeyError) else "coordinate_out_of_image"
        problems.append(Problem(task.study_id, task.series_id,
                                _relative(task.series_dir / f"{req.instance_number}.dcm",
                                          task.data_dir), -1, kind, "skipped",
                                str(res).strip("'\"")))
    return ids, crops, problems


class _ShardWriter:
    """Writes series' rows into the partial store, then their markers after one sync.

    Rows go straight into the file (``pwrite``, no memory map to fault in and msync). A
    marker is only written after ``commit`` has synced the rows of its series to disk, so a
    marker always means its rows are complete; a series killed before that has no marker and
    is redone. One sync per chunk of series instead of one per series.
    """

    def __init__(self, crops_file: str) -> None:
        store = np.load(crops_file, mmap_mode="r")
        self._offset, self._row_bytes = int(store.offset), int(np.prod(store.shape[1:]))
        del store
        self._fd = os.open(crops_file, os.O_RDWR)
        self._pending: list[tuple[SeriesTask, list[int], list[Problem]]] = []
        self._dirty = False

    def add(self, task: SeriesTask, ids: list[int], crops: Sequence[np.ndarray],
            problems: list[Problem]) -> None:
        """Write the series' rows (not yet synced); its marker waits for ``commit``."""
        for k, sid in enumerate(ids):
            row = np.ascontiguousarray(crops[k])
            if os.pwrite(self._fd, row, self._offset + int(sid) * self._row_bytes) != row.nbytes:
                raise OSError(f"short write to {task.crops_file}")
            self._dirty = True
        self._pending.append((task, [int(i) for i in ids], problems))

    def commit(self) -> None:
        """Sync the rows written so far, then write the waiting markers."""
        if self._dirty:
            getattr(os, "fdatasync", os.fsync)(self._fd)
            self._dirty = False
        for task, ids, problems in self._pending:
            marker = {"fingerprint": task.fingerprint, "sample_ids": ids,
                      "problems": [dataclasses.asdict(p) for p in problems]}
            _write_marker(Path(task.shard), json.dumps(marker))
        self._pending.clear()

    def close(self) -> None:
        os.close(self._fd)


def _write_marker(path: Path, text: str) -> None:
    """Atomic rename without fsync: the rows it vouches for are already synced, and a marker
    lost or torn by a power cut only makes its series be redone (``_read_shard`` -> None)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_shard(task: SeriesTask, ids: list[int], crops: np.ndarray,
                 problems: list[Problem]) -> None:
    """Put one series' crops into their rows of the partial store, sync, write its marker."""
    writer = _ShardWriter(task.crops_file)
    try:
        writer.add(task, ids, crops, problems)
        writer.commit()
    finally:
        writer.close()


def _read_shard(path: str | Path, fingerprint: str) -> tuple[list[int], list[Problem]] | None:
    """``(sample_ids, problems)`` of a series' marker; None if absent, stale or damaged."""
    try:
        marker = json.loads(Path(path).read_text())
        if marker["fingerprint"] != fingerprint:
            return None
        return marker["sample_ids"], [Problem(**p) for p in marker["problems"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_task(args: tuple[SeriesTask, DataConfig]) -> tuple[int, int, int]:
    """Worker entry point: process one series, store it; returns (series, ok, problems)."""
    task, data_cfg = args
    return run_chunk(((task,), data_cfg))[0]


def run_chunk(args: tuple[Sequence[SeriesTask], DataConfig]) -> list[tuple[int, int, int]]:
    """Worker entry point: process a few series, store them with one sync.

    Returns:
        ``(series, ok, problems)`` per series.
    """
    tasks, data_cfg = args
    if not tasks:
        return []
    writer = _ShardWriter(tasks[0].crops_file)
    out = []
    try:
        for task in tasks:
            ids, crops, problems = _series_crops(task, data_cfg)  # no stacked copy
            writer.add(task, ids, crops, problems)
            out.append((task.series_id, len(ids), len(problems)))
        writer.commit()
    finally:
        writer.close()
    return out


def _init_worker() -> None:
    import signal

    import cv2

    # One process per core already; OpenCV's own threads would only oversubscribe.
    cv2.setNumThreads(1)
    # Ctrl-C is the parent's to handle (it terminates the pool); a worker dying mid-series
    # on its own SIGINT would only add tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- prepare: index -> tasks -> shards -> final store ------------------------------------------


def make_tasks(data_dir: str | Path, index: pd.DataFrame, shards_dir: Path,
               crops_file: Path) -> list[SeriesTask]:
    """One task per series of the index, sample ids = index positions, in index order."""
    tasks = []
    for (study, series), group in index.groupby(["study_id", "series_id"], sort=True):
        requests = tuple(CropRequest(int(r.instance_number), float(r.x), float(r.y))
                         for r in group.itertuples())
        tasks.append(SeriesTask(str(data_dir), int(study), int(series),
                                tuple(int(i) for i in group.index), requests,
                                str(shards_dir / f"{study}_{series}.json"), str(crops_file)))
    return tasks


def _chunks(tasks: list[SeriesTask], workers: int) -> list[tuple[SeriesTask, ...]]:
    """Series grouped for one sync each: about four chunks per worker, at most 8 series."""
    size = max(1, min(8, -(-len(tasks) // (4 * max(workers, 1)))))
    return [tuple(tasks[i:i + size]) for i in range(0, len(tasks), size)]


def _start_method() -> str:
    """'fork' on Linux when it is safe, else 'spawn'.

    fork starts a worker in milliseconds instead of re-importing numpy/pandas/OpenCV/pydicom
    (~0.6 s each). It is safe while this process runs no other thread (a forked child would
    inherit locks held by them) and has not initialised CUDA; workers set OpenCV to one
    thread, so no OpenCV thread pool state is used in them.
    """
    import sys
    import threading

    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return "spawn"
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None:
        try:
            if torch.cuda.is_initialized():
                return "spawn"
        except Exception:  # an odd torch build: be safe
            return "spawn"
    return "fork"


def _run_tasks(tasks: list[SeriesTask], data_cfg: DataConfig, workers: int,
               progress: bool) -> None:
    """Run the tasks whose shard is missing, in ``workers`` processes (1: in-process)."""
    from tqdm import tqdm

    todo = [t for t in tasks if _read_shard(t.shard, t.fingerprint) is None]
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d series already done", len(tasks) - len(todo), len(tasks))
    jobs = [(chunk, data_cfg) for chunk in _chunks(todo, workers)]
    pool = None
    if workers > 1 and len(jobs) > 1:
        # Before the progress bar, whose monitor thread would make fork unsafe.
        ctx = multiprocessing.get_context(_start_method())
        pool = ctx.Pool(min(workers, len(jobs)), initializer=_init_worker)
    # No tqdm at all without progress: even a disabled bar starts tqdm's monitor thread, which
    # would make the next prepare in this process fall back to spawn.
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="prepare",
               unit="series", dynamic_ncols=True) if progress else None
    kill_after = os.environ.get(KILL_ENV)
    finished = 0
    try:
        results = map(run_chunk, jobs) if pool is None else pool.imap_unordered(run_chunk, jobs)
        for done in results:
            if bar is not None:
                bar.update(len(done))
            finished += len(done)
            if kill_after is not None and finished >= int(kill_after):
                _kill_self()
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()  # as ``with Pool``: every job is done or the run is abandoned
            pool.join()


def _kill_self() -> None:
    """SIGKILL this process's group if it leads one (workers included), else this process."""
    import signal

    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _consolidate(cache_dir: Path, index: pd.DataFrame, tasks: list[SeriesTask],
                 problems: list[Problem], data_cfg: DataConfig, extra_meta: dict) -> None:
    """Turn the partial store + markers into crops.npy/index.csv/problems.csv/meta.json.

    When every sample succeeded the partial store already is the final one and is renamed;
    otherwise the successful rows are copied, in index order, into a new file. crops.npy is
    renamed into place after index.csv and problems.csv, and meta.json comes last.
    """
    kept: list[int] = []
    for task in tasks:
        marker = _read_shard(task.shard, task.fingerprint)
        if marker is None:
            raise RuntimeError(f"marker {task.shard} vanished while consolidating")
        kept.extend(marker[0])
        problems.extend(marker[1])
    kept.sort()
    final = index.loc[kept].reset_index(drop=True)
    final["row"] = np.arange(len(final), dtype=np.int64)
    shape = (len(kept), data_cfg.n_slices, 3, data_cfg.img_size, data_cfg.img_size)
    _write_index(cache_dir / INDEX_FILE, final)
    problems = sorted(set(problems), key=lambda p: (p.study_id, p.series_id, p.file, p.row,
                                                    p.kind, p.message))
    write_problems(cache_dir / PROBLEMS_FILE, problems)
    partial = Path(tasks[0].crops_file)
    if len(kept) == len(index):
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, cache_dir / CROPS_FILE)
    else:
        store = np.load(partial, mmap_mode="r")
        with atomic_path(cache_dir / CROPS_FILE, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            for start in range(0, len(kept), 256):  # bounded memory
                rows = kept[start:start + 256]
                out[start:start + len(rows)] = store[rows]
            out.flush()
            del out
        del store
        partial.unlink()
    extra = dict(extra_meta)
    extra["counts_problems"] = dict(sorted(Counter(p.kind for p in problems).items()))
    meta = _meta(dataclasses.asdict(data_cfg), final, shape, extra)
    atomic_write_text(cache_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


def _partial_store(cache_dir: Path, fingerprint: str, shape: tuple[int, ...]) -> Path:
    """The preallocated store the workers write into; a new one forgets all markers.

    Named by the index fingerprint, so a changed index never reuses rows of another.
    """
    path = cache_dir / f"crops.partial-{fingerprint}.npy"
    if path.is_file():
        try:
            if np.load(path, mmap_mode="r").shape == shape:
                return path
        except ValueError:
            pass  # torn header of a killed creation: start again
    for old in cache_dir.glob("crops.partial-*.npy"):
        old.unlink()
    shutil.rmtree(cache_dir / SHARDS_DIR, ignore_errors=True)
    with atomic_path(path, suffix=".npy") as tmp:  # sparse: no zeros are actually written
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
    return path


def _index_fingerprint(index: pd.DataFrame) -> str:
    blob = index.to_csv(index=False, float_format="%.6g").encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare(data_dir: str | Path, out_dir: str | Path, data_cfg: DataConfig, workers: int = 1,
            progress: bool = True) -> Path:
    """Build (or finish, or reuse) the crop cache of ``data_cfg.condition``.

    Args:
        data_dir: an RSNA 2024 Lumbar Spine folder (CSVs + ``train_images/``).
        out_dir: cache root; the cache goes to ``out_dir/<condition>-<hash8>/``.
        data_cfg: preprocessing settings (every number of the pipeline).
        workers: processes reading series in parallel (1: in this process).
        progress: show a tqdm bar.

    Returns:
        The cache folder (open it with :meth:`CropCache.open`).

    Raises:
        UserError: the data folder lacks the CSVs, or no sample could be prepared.
    """
    data_dir = Path(data_dir)
    cache_dir = Path(out_dir) / cache_key(data_cfg)
    index, problems = build_index(data_dir, data_cfg.condition)
    fingerprint = _index_fingerprint(index)
    meta_path = cache_dir / META_FILE
    if meta_path.is_file() and (cache_dir / CROPS_FILE).is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("index_fingerprint") == fingerprint:
            log.info("cache %s is complete and up to date; nothing to do", cache_dir)
            return cache_dir
        meta_path.unlink()  # same settings, different labels: rebuild (shards re-checked)
    if index.empty:
        raise UserError(f"{data_dir}: no usable {data_cfg.condition} label; see the problems "
                        "above (empty labels, missing series, ...)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    shape = (len(index), data_cfg.n_slices, 3, data_cfg.img_size, data_cfg.img_size)
    partial = _partial_store(cache_dir, fingerprint, shape)
    shards_dir = cache_dir / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(data_dir, index, shards_dir, partial)
    _run_tasks(tasks, data_cfg, workers, progress)
    _consolidate(cache_dir, index, tasks, problems, data_cfg,
                 {"cache_key": cache_dir.name, "index_fingerprint": fingerprint,
                  "data_dir": str(data_dir.resolve()), "series": len(tasks)})
    shutil.rmtree(shards_dir, ignore_errors=True)
    for leftover in cache_dir.glob(".*"):  # atomic_path temporaries of a killed writer
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
    return cache_dir


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


def crops_from_dicom(series_dir: str | Path, requests: Sequence[CropRequest],
                     data_cfg: DataConfig) -> list[np.ndarray]:
    """The naive path: per request, read only its slices' files and process whole slices.

    As public notebooks do, nothing is shared between requests: each one reads the series'
    headers (for the spatial order), decodes its ``n_slices`` files, windows and equalises
    each whole slice, then crops. Gives the same crops as :func:`prepare` (tests, benchmark).

    Raises:
        KeyError, CoordinateOutOfImage: as :meth:`VolumeCropper.slice_plan`.
    """
    from spinegrade.io.dicom import read_series

    cropper = _cropper(data_cfg)
    out = []
    for req in requests:
        header_volume = read_series(series_dir, [req.instance_number], load_pixels=False)
        volume = dataclasses.replace(header_volume, slices=_LazySlices(header_volume.files))
        (result,) = cropper(volume, [req])
        if isinstance(result, Exception):
            raise result
        out.append(result)
    return out


class _LazySlices(Sequence):
    """Slices of a headers-only Volume, decoded from their file on first access."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, j):  # type: ignore[override]
        from spinegrade.io.dicom import decode_pixels, read_header

        if j not in self._cache:
            header, ds, _ = read_header(self.files[j], with_pixels=True)
            self._cache[j] = decode_pixels(ds, header)
        return self._cache[j]
