"""Benchmark: series-level ``prepare`` vs the naive per-sample path, on one synthetic dataset.

(a) ``prepare`` reads each series once, windows + CLAHEs each needed slice once and cuts all of
the series' crops; (b) the naive path, as typical public notebooks do, handles each sample on
its own: it reads the series headers (for the spatial order) and its 7 DICOM files, and
windows + CLAHEs whole slices. Both must give identical crops. Each measurement runs in a fresh
spawned process so its peak memory (ru_maxrss) is its own. Prints samples/s, peak memory, the
workers=1 vs workers=2 scaling, and last ``speedup: <ratio>x`` (b's time over a's, one
worker, best of ``--repeat`` rounds). Imports are done before each clock starts.

The pipeline is imported inside the measured functions, not at the top: each runs in a
spawned child that should load it while measured, and this parent stays small so the
children's peak RSS (which Linux carries across fork + exec) is their own.

    python benchmarks/prepare.py [--studies 30] [--repeat 3] [--condition spinal_canal_stenosis]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from spinegrade.config import DataConfig
from spinegrade.constants import CONDITIONS


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _import_pipeline() -> None:
    """Import what both paths use (pydicom, OpenCV, pandas, tqdm) before their clocks start,
    and run OpenCV on one thread: the figures compare pipelines on one core each (as one
    ``prepare`` worker does), not interpreter start-up or OpenCV's own thread pool."""
    import cv2
    import tqdm  # noqa: F401

    import spinegrade.data.prepare  # noqa: F401
    import spinegrade.data.reference  # noqa: F401

    cv2.setNumThreads(1)


def run_prepare(data_dir: str, out_dir: str, cfg: DataConfig, workers: int) -> dict:
    """(a) Time ``prepare`` (index, all series, consolidation) in this process."""
    from spinegrade.data.cache import CropCache
    from spinegrade.data.prepare import prepare

    _import_pipeline()

    t0, c0 = time.perf_counter(), _cpu_seconds()
    path = prepare(data_dir, out_dir, dataclasses.asdict(cfg), workers=workers, progress=False)
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    n = len(CropCache.open(path))
    return {"path": str(path), "n": n, "seconds": elapsed, "cpu": cpu,
            "rss": max(_rss_mib(resource.RUSAGE_SELF), _rss_mib(resource.RUSAGE_CHILDREN))}


def run_naive(data_dir: str, out_file: str, cfg: DataConfig, rows: list[tuple]) -> dict:
    """(b) Time the naive path over ``rows`` (study, series, instance, x, y); crops to a .npy."""
    from spinegrade.data.preprocess import CropRequest
    from spinegrade.data.reference import crops_from_dicom
    from spinegrade.data.rsna import series_folder

    _import_pipeline()
    settings = dataclasses.asdict(cfg)

    shape = (len(rows), cfg.n_slices, 3, cfg.img_size, cfg.img_size)
    out = np.lib.format.open_memmap(out_file, mode="w+", dtype=np.uint8, shape=shape)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for k, (study, series, instance, x, y) in enumerate(rows):
        (out[k],) = crops_from_dicom(series_folder(data_dir, study, series),
                                     [CropRequest(instance, x, y)], settings)
    out.flush()
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {"n": len(rows), "seconds": elapsed, "cpu": cpu, "rss": _rss_mib(resource.RUSAGE_SELF)}


def same_crops(cache1: str, naive_file: str, cache2: str) -> int:
    """Number of samples, after asserting that the three paths gave identical crops."""
    from spinegrade.data.cache import CropCache

    cached = CropCache.open(cache1).crops
    naive = np.load(naive_file, mmap_mode="r")
    assert np.array_equal(cached, naive), "series path and naive path crops differ"
    assert np.array_equal(cached, CropCache.open(cache2).crops), "workers=2 differs"
    return int(cached.shape[0])


def in_fresh_process(fn, *args):
    """Run ``fn(*args)`` in a new spawned interpreter (clean imports, own peak memory)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _line(name: str, r: dict) -> str:
    return (f"{name:<34} {r['seconds']:7.2f} s  {r['n'] / r['seconds']:6.1f} samples/s  "
            f"(CPU {r['cpu']:6.2f} s)  peak RSS {r['rss']:5.0f} MiB")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--condition", default=CONDITIONS[0], choices=CONDITIONS)
    ap.add_argument("--img-size", type=int, default=DataConfig.img_size)
    ap.add_argument("--data", help="use this RSNA-format dataset instead of generating one")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of the three measurements; minimum and median are reported")
    return ap.parse_args(argv)


def _one_round(r: int, data_dir: Path, tmp: str, cfg: DataConfig, rows: list[tuple] | None
               ) -> tuple[tuple[dict, dict, dict], int, list[tuple]]:
    """(a) workers=1, (b), (a) workers=2, each in a fresh process; crops checked equal."""
    from spinegrade.data.cache import CropCache

    a1 = in_fresh_process(run_prepare, str(data_dir), f"{tmp}/c1-{r}", cfg, 1)
    if rows is None:
        rows = list(CropCache.open(a1["path"]).index[
            ["study_id", "series_id", "instance_number", "x", "y"]].itertuples(index=False))
        rows = [(int(s), int(se), int(i), float(x), float(y)) for s, se, i, x, y in rows]
    b = in_fresh_process(run_naive, str(data_dir), f"{tmp}/naive-{r}.npy", cfg, rows)
    a2 = in_fresh_process(run_prepare, str(data_dir), f"{tmp}/c2-{r}", cfg, 2)
    print(f"round {r + 1}:")
    print("  " + _line("(a) series path, prepare workers=1", a1))
    print("  " + _line("(b) naive per-sample path", b))
    print("  " + _line("(a) series path, prepare workers=2", a2))
    # In a child: this process stays small, so the next children's peak RSS (which
    # Linux carries across fork + exec) is their own.
    n = in_fresh_process(same_crops, a1["path"], f"{tmp}/naive-{r}.npy", a2["path"])
    for done in (a1["path"], a2["path"], f"{tmp}/naive-{r}.npy"):  # bounded disk use
        shutil.rmtree(done) if Path(done).is_dir() else Path(done).unlink()
    return (a1, b, a2), n, rows


def _report(rounds: list[tuple[dict, dict, dict]], n: int) -> None:
    def best(k: int, key: str = "seconds") -> float:
        return min(rd[k][key] for rd in rounds)

    def median(k: int, key: str = "seconds") -> float:
        return float(np.median([rd[k][key] for rd in rounds]))

    for k, name in enumerate(("(a) workers=1", "(b) naive", "(a) workers=2")):
        print(f"{name:<14} wall min {best(k):6.2f} s  median {median(k):6.2f} s   "
              f"CPU min {best(k, 'cpu'):6.2f} s  median {median(k, 'cpu'):6.2f} s")
    print(f"scaling workers=2 vs 1 (min wall): {best(0) / best(2):.2f}x "
          f"({n / best(0):.1f} -> {n / best(2):.1f} samples/s)")
    # CPU time is the steadier figure on a shared machine; wall time is the headline. The
    # minimum over rounds is the run least disturbed by other load (as timeit reports).
    print(f"cpu-time speedup: {best(1, 'cpu') / best(0, 'cpu'):.2f}x")
    print(f"speedup: {best(1) / best(0):.2f}x")


def main(argv: list[str] | None = None) -> int:
    from spinegrade.data.rsna import build_index
    from spinegrade.data.synthetic import generate

    args = _parse_args(argv)
    cfg = dataclasses.replace(DataConfig(), condition=args.condition, img_size=args.img_size)
    with tempfile.TemporaryDirectory(prefix="spinegrade-bench-") as tmp:
        data_dir = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            t0 = time.perf_counter()
            generate(data_dir, n_studies=args.studies, seed=args.seed, progress=False)
            print(f"generated {args.studies} synthetic studies in {time.perf_counter() - t0:.1f} s")
        index, _ = build_index(data_dir, cfg.condition)
        print(f"{cfg.condition}: {len(index)} samples in {index['series_id'].nunique()} series, "
              f"crops {cfg.n_slices}x3x{cfg.img_size}x{cfg.img_size}")
        rounds: list[tuple[dict, dict, dict]] = []
        rows = None
        for r in range(max(1, args.repeat)):
            # Each round in fresh processes, so a change in the machine's load hits all three
            # alike; every round builds anew.
            measured, n, rows = _one_round(r, data_dir, tmp, cfg, rows)
            rounds.append(measured)
        print(f"identical crops: yes, {n} samples in every round (series path = naive path = "
              "workers=2)")
        _report(rounds, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
