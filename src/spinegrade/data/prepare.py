"""Building a crop cache: the parallel, resumable prepare engine (the store is ``data.cache``).

While preparing, the cache folder holds ``crops.partial-<index hash>.npy`` (preallocated, one
row per index row) and ``shards/<study>_<series>.json`` markers. Each series is read once
(every file parsed once, only the slices some crop needs decoded), each such slice is
windowed and equalised once, and all of the series' crops are written into their rows of
the partial store. Series run in chunks of a few: the chunk's rows are synced to disk, and
only then are its series' markers written (atomically). A rerun after an interruption
(Ctrl-C, kill -9) skips series whose marker exists and matches their task, and redoes the
others. At the end the partial store is renamed to ``crops.npy`` (or, when some samples
failed, its good rows are copied), after ``index.csv`` and ``problems.csv`` and before
``meta.json``; markers are removed.

Settings are the plain dict ``data.cache`` describes (``dataclasses.asdict(cfg.data)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from spinegrade.data.cache import (
    CROPS_FILE,
    INDEX_FILE,
    META_FILE,
    cache_key,
    cache_meta,
    dataset_fingerprint,
    index_fingerprint,
    is_current_cache,
    write_index,
)
from spinegrade.data.jitter import check_settings, jitter_requests, training_index
from spinegrade.data.preprocess import CropRequest, VolumeCropper, build_cropper
from spinegrade.data.rsna import series_folder
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path, atomic_write_text
from spinegrade.io.dicom import Volume, read_series
from spinegrade.io.dicom_file import PixelDecodeError
from spinegrade.problems import PROBLEMS_FILE, Problem, Severity, write_problems

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
# Fault injection for tests/test_prepare.py (see ``kill_for_test``): the one test hook here.
KILL_ENV = "SPINEGRADE_KILL_AFTER_SHARDS"

Crops = tuple[list[int], list[np.ndarray], list[Problem]]  # (sample ids, crops, problems)


# --- one series -> its rows of the partial store (runs in worker processes) -------------------


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
        return series_folder(self.data_dir, self.study_id, self.series_id)


_CROPPERS: dict[str, VolumeCropper] = {}


def cropper_for(settings: Mapping[str, Any]) -> VolumeCropper:
    """The cropper of ``settings``, built once per process."""
    key = json.dumps(dict(settings), sort_keys=True)
    if key not in _CROPPERS:
        # build_cropper reads attributes (engine/predict passes cfg.data itself).
        _CROPPERS[key] = build_cropper(SimpleNamespace(**settings))
    return _CROPPERS[key]


def _relative(path: str | Path, root: str | Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _reader_problems(task: SeriesTask, volume: Volume) -> list[Problem]:
    """The reader's notes with study and series: unused files skipped, the rest warnings."""
    used = {str(f) for f in volume.files}
    out = []
    for p in volume.problems:
        skipped = p.file != str(task.series_dir) and p.file not in used
        out.append(dataclasses.replace(
            p, study_id=task.study_id, series_id=task.series_id,
            file=_relative(p.file, task.data_dir),
            kind="unreadable_file" if skipped else "series_warning",
            severity=Severity.SKIPPED if skipped else Severity.WARNING))
    return out


def _read_volume(task: SeriesTask, cropper: VolumeCropper, fail: Callable[[str, str], Problem]
                 ) -> tuple[Volume | None, list | None, list[Problem]]:
    """Read the series (lazily) and cut its crops: ``(volume, results or None, problems)``.

    ``results`` is None when cropping must be retried on the volume (after the reader's
    problems are known); ``volume`` is None when the series cannot be read at all.
    """
    wanted = [r.instance_number for r in task.requests]
    try:
        volume = read_series(task.series_dir, wanted, lazy_pixels=True)
    except Exception as e:  # a damaged series must never stop the run
        return None, None, [fail("unreadable_series", f"{type(e).__name__}: {e}")]
    try:
        return volume, cropper(volume, task.requests), []
    except PixelDecodeError:  # rare: let the eager reader drop and report the file
        try:
            return read_series(task.series_dir, wanted), None, []
        except Exception as e:  # same reason as above
            return None, None, [fail("unreadable_series", f"{type(e).__name__}: {e}")]
    except Exception:  # reported by the retry, with the reader's problems
        return volume, None, []


def series_crops(task: SeriesTask, settings: Mapping[str, Any]) -> Crops:
    """Read one series once and cut all its crops, one array per successful sample.

    Every file is parsed once, but only the slices some crop needs are decoded (windows and
    CLAHE likewise run once per needed slice). A used slice that fails to decode makes the
    series be read again eagerly, which drops that file from the stack exactly as before.

    Returns:
        ``(sample_ids, crops, problems)`` for the samples that succeeded; a series that cannot
        be read gives no crops and a problem, never an exception.
    """
    n_slices = settings["n_slices"]
    rel_dir = _relative(task.series_dir, task.data_dir)

    def fail(kind: str, message: str) -> Problem:
        return Problem.skipped(kind=kind, study_id=task.study_id, series_id=task.series_id,
                               file=rel_dir, message=message)

    cropper = cropper_for(settings)
    volume, results, problems = _read_volume(task, cropper, fail)
    if volume is None:
        return [], [], problems
    problems = _reader_problems(task, volume)
    if len(volume.slices) < n_slices:
        problems.append(Problem.warning(
            kind="short_series", study_id=task.study_id, series_id=task.series_id,
            file=rel_dir, message=f"{len(volume.slices)} slices < n_slices={n_slices}; "
                                  "edge slices replicated"))
    try:
        if results is None:
            results = cropper(volume, task.requests)
    except Exception as e:  # e.g. geometry a crop cannot use; skip the series, keep going
        return [], [], problems + [fail("crop_failed", f"{type(e).__name__}: {e}")]
    ids, crops = [], []
    for sid, req, res in zip(task.sample_ids, task.requests, results, strict=True):
        if isinstance(res, np.ndarray):
            ids.append(sid)
            crops.append(res)
            continue
        kind = "missing_instance" if isinstance(res, KeyError) else "coordinate_out_of_image"
        problems.append(Problem.skipped(
            kind=kind, study_id=task.study_id, series_id=task.series_id,
            file=_relative(task.series_dir / f"{req.instance_number}.dcm", task.data_dir),
            message=str(res).strip("'\"")))
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
                      "problems": [p.to_record() for p in problems]}
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


def _read_shard(path: str | Path, fingerprint: str) -> tuple[list[int], list[Problem]] | None:
    """``(sample_ids, problems)`` of a series' marker; None if absent, stale or damaged."""
    try:
        marker = json.loads(Path(path).read_text())
        if marker["fingerprint"] != fingerprint:
            return None
        return marker["sample_ids"], [Problem.from_record(p) for p in marker["problems"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_chunk(args: tuple[Sequence[SeriesTask], Mapping[str, Any]]) -> list[tuple[int, int, int]]:
    """Worker entry point: process a few series, store them with one sync.

    Returns:
        ``(series, ok, problems)`` per series.
    """
    tasks, settings = args
    if not tasks:
        return []
    writer = _ShardWriter(tasks[0].crops_file)
    out = []
    try:
        for task in tasks:
            ids, crops, problems = series_crops(task, settings)
            writer.add(task, ids, crops, problems)
            out.append((task.series_id, len(ids), len(problems)))
        writer.commit()
    finally:
        writer.close()
    return out


def _init_worker() -> None:
    # One process per core already; OpenCV's own threads would only oversubscribe.
    cv2.setNumThreads(1)
    # Ctrl-C is the parent's to handle (it terminates the pool); a worker dying mid-series
    # on its own SIGINT would only add tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- prepare: index -> tasks -> shards -> final store ------------------------------------------


def make_tasks(data_dir: str | Path, index: pd.DataFrame, shards_dir: Path,
               crops_file: Path, settings: Mapping[str, Any] | None = None) -> list[SeriesTask]:
    """One task per series, sample ids = index positions; jitter from ``settings``."""
    tasks = []
    for (study, series), group in index.groupby(["study_id", "series_id"], sort=True):
        requests = tuple(CropRequest(int(r.instance_number), float(r.x), float(r.y))
                         for r in group.itertuples())
        requests = jitter_requests(requests, list(group.index), settings or {})
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
    (~0.6 s each). It is safe while this process runs no other thread, native ones included
    (/proc/self/task: a child forked after OpenCV's pool started hangs in cv2.setNumThreads)
    and has not initialised CUDA; workers set OpenCV to one thread.
    """
    if not sys.platform.startswith("linux") or len(os.listdir("/proc/self/task")) > 1:
        return "spawn"
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None:
        try:
            if torch.cuda.is_initialized():
                return "spawn"
        except Exception:  # an odd torch build: be safe
            return "spawn"
    return "fork"


def _run_tasks(tasks: list[SeriesTask], settings: Mapping[str, Any], workers: int,
               progress: bool) -> None:
    """Run the tasks whose shard is missing, in ``workers`` processes (1: in-process)."""
    todo = [t for t in tasks if _read_shard(t.shard, t.fingerprint) is None]
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d series already done", len(tasks) - len(todo), len(tasks))
    jobs = [(chunk, dict(settings)) for chunk in _chunks(todo, workers)]
    pool = None
    if workers > 1 and len(jobs) > 1:
        # Before the progress bar, whose monitor thread would make fork unsafe.
        ctx = multiprocessing.get_context(_start_method())
        pool = ctx.Pool(min(workers, len(jobs)), initializer=_init_worker)
    # No tqdm at all without progress: even a disabled bar starts tqdm's monitor thread, which
    # would make the next prepare in this process fall back to spawn.
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="prepare",
               unit="series", dynamic_ncols=True) if progress else None
    finished = 0
    try:
        results = map(run_chunk, jobs) if pool is None else pool.imap_unordered(run_chunk, jobs)
        for done in results:
            if bar is not None:
                bar.update(len(done))
            finished += len(done)
            kill_for_test(finished)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()  # as ``with Pool``: every job is done or the run is abandoned
            pool.join()


def kill_for_test(series_done: int) -> None:
    """Fault injection for tests/test_prepare.py's kill -9 resume test; nothing otherwise.

    When ``$SPINEGRADE_KILL_AFTER_SHARDS`` (``KILL_ENV``) is set and ``series_done`` series
    have reported back (their markers written), SIGKILL this process's group if it leads
    one (itself and its workers, like ``kill -9`` of the group), else this process.
    """
    kill_after = os.environ.get(KILL_ENV)
    if kill_after is None or series_done < int(kill_after):
        return
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _consolidate(cache_dir: Path, index: pd.DataFrame, tasks: list[SeriesTask],
                 problems: list[Problem], settings: Mapping[str, Any], extra_meta: dict) -> None:
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
    shape = _crops_shape(len(kept), settings)
    write_index(cache_dir / INDEX_FILE, final)
    problems = sorted(set(problems), key=Problem.sort_key)
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
    meta = cache_meta(settings, final, shape, extra)
    atomic_write_text(cache_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


def _crops_shape(n: int, settings: Mapping[str, Any]) -> tuple[int, ...]:
    size = settings["img_size"]
    return (n, settings["n_slices"], 3, size, size)


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


def prepare(data_dir: str | Path, out_dir: str | Path, settings: Mapping[str, Any],
            workers: int = 1, progress: bool = True) -> Path:
    """Build (or finish, or reuse) the crop cache of ``settings["condition"]``.

    Args:
        data_dir: an RSNA 2024 Lumbar Spine folder (CSVs + ``train_images/``).
        out_dir: cache root; the cache goes to ``out_dir/<condition>-<hash8>/``.
        settings: the data settings, every number of the pipeline
            (``dataclasses.asdict(cfg.data)``).
        workers: processes reading series in parallel (1: in this process).
        progress: show a tqdm bar.

    Returns:
        The cache folder (open it with :meth:`CropCache.open`). Its name covers the pixel
        settings and the dataset's label CSVs (:func:`dataset_fingerprint`): another dataset
        into the same ``out_dir`` makes another folder.

    Raises:
        UserError: the data folder lacks the CSVs, no sample could be prepared, or a
            complete cache of the same CSVs holds other samples (it is not replaced).
    """
    data_dir = Path(data_dir)
    condition = settings["condition"]
    check_settings(settings)
    index, problems = training_index(data_dir, settings)
    dataset = dataset_fingerprint(data_dir)
    cache_dir = Path(out_dir) / cache_key(settings, dataset["fingerprint"])
    fingerprint = index_fingerprint(index)
    if is_current_cache(cache_dir, fingerprint):
        log.info("cache %s is complete and up to date; nothing to do", cache_dir)
        return cache_dir
    if index.empty:
        raise UserError(f"{data_dir}: no usable {condition} label; see the problems "
                        "above (empty labels, missing series, ...)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = _partial_store(cache_dir, fingerprint, _crops_shape(len(index), settings))
    shards_dir = cache_dir / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(data_dir, index, shards_dir, partial, settings)
    _run_tasks(tasks, settings, workers, progress)
    _consolidate(cache_dir, index, tasks, problems, settings,
                 {"cache_key": cache_dir.name, "index_fingerprint": fingerprint,
                  "data_dir": str(data_dir.resolve()), "dataset": dataset,
                  "series": len(tasks)})
    shutil.rmtree(shards_dir, ignore_errors=True)
    for leftover in cache_dir.glob(".*"):  # atomic_path temporaries of a killed writer
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
    return cache_dir
