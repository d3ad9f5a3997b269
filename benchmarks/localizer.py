"""Benchmark: the CPU-sized localizer, trained on one synthetic seed, judged on another.

Synthesizes ``--train-studies`` labelled studies (seed ``--seed``) and ``--test-studies``
labelled studies from another seed (``--seed + 1000``: other anatomy, spacings, matrices and
series geometry), trains ``configs/localizer.yaml`` (all three series types) on the first
set, locates every level of every test study the way ``spinegrade predict`` does (Sagittal
T2/STIR labels the discs on the whole spine, Sagittal T1 searches near them, the axial slice
comes from the 3D geometry) and compares with the test labels in patient coordinates.

Prints the training wall time and CPU threads, then per series type the wrong-disc rate,
the share of points within +-1 slice and the median / 90th-percentile point error, and last
the four target figures::

    train time: <s> s
    wrong-disc Sagittal T2/STIR: <rate>   (target <= 0.01)
    wrong-disc Sagittal T1: <rate>        (target <= 0.01)
    axial levels within +-1 slice: <share> (target >= 0.98)
    median point error: <mm> mm           (target <= 2 mm)

    python benchmarks/localizer.py [--work DIR] [--train-studies 80] [--test-studies 20]
        [--seed 0] [--threads 2] [--set localizer.epochs=8 ...] [--reuse]
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from spinegrade.config import load_config
from spinegrade.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from spinegrade.data.rsna import LABELLED_SPLIT
from spinegrade.data.synthetic import generate
from spinegrade.engine.localization_check import localization_summary, located_errors, read_truth
from spinegrade.engine.localize import LocalizerRun
from spinegrade.engine.localizer import train_localizer
from spinegrade.engine.studies import locate_levels, read_volumes, studies_from_dataset
from spinegrade.problems import Problem

TEST_SEED_OFFSET = 1000


def _cpu_seconds() -> float:
    """CPU time of this process (user + system): on a shared machine, the cost of the work."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _synth(folder: Path, n: int, seed: int, reuse: bool) -> None:
    if reuse and (folder / "train_label_coordinates.csv").is_file():
        return
    generate(folder, n, seed, n_test=2, progress=False, overwrite=True)


def _test_errors(run: LocalizerRun, test_dir: Path) -> pd.DataFrame:
    """Every labelled point of every test study against where the localizer put it."""
    problems: list[Problem] = []
    truth = read_truth(test_dir, LABELLED_SPLIT, problems)
    frames = []
    for st in studies_from_dataset(test_dir, LABELLED_SPLIT):
        volumes = read_volumes(st, problems)
        located = locate_levels(run, st, volumes, problems)
        frames.append(located_errors(located, truth, {k: v for k, (_, v) in volumes.items()}))
    return pd.concat(frames, ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for data and run (default: temp)")
    ap.add_argument("--train-studies", type=int, default=80)
    ap.add_argument("--test-studies", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="seed of the training studies")
    ap.add_argument("--test-seed", type=int, default=None,
                    help=f"seed of the test studies (default: --seed + {TEST_SEED_OFFSET})")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target: 2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override key=value (repeatable)")
    ap.add_argument("--reuse", action="store_true", help="reuse data already in --work")
    ap.add_argument("--eval-only", action="store_true",
                    help="judge the run already in --work/run instead of training")
    ap.add_argument("--progress", action="store_true", help="progress bars while training")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="spinegrade-loc-bench-"))
    train_dir, test_dir, run_dir = work / "train", work / "test", work / "run"
    _synth(train_dir, args.train_studies, args.seed, args.reuse)
    test_seed = args.seed + TEST_SEED_OFFSET if args.test_seed is None else args.test_seed
    _synth(test_dir, args.test_studies, test_seed, args.reuse)
    cfg = load_config("localizer", args.overrides)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    if not args.eval_only:
        train_localizer(cfg, train_dir, run_dir, resume=False, progress=args.progress)
    train_s, train_cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    errors = _test_errors(LocalizerRun.load(run_dir, "cpu", cfg.predict.localizer_shifts), test_dir)
    errors.to_csv(work / "test_errors.csv", index=False)  # one row per test point
    table = localization_summary(errors)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    overall = table[table["level"] == "all"].set_index("series_description")
    if args.eval_only:
        print("train time: not trained here (--eval-only)")
    else:
        print(f"train time: {train_s:.0f} s wall, {train_cpu:.0f} CPU-s ({args.train_studies} "
              f"studies, {args.threads} threads, {', '.join(cfg.localizer.series)}; reading "
              "the DICOMs included)")
    for desc in (SAGITTAL_T2, SAGITTAL_T1):
        rate = overall.loc[desc, "wrong_disc_rate"] if desc in overall.index else float("nan")
        print(f"wrong-disc {desc}: {rate:.4f}   (target <= 0.01)")
    axial = overall.loc[AXIAL_T2, "slice_within1"] if AXIAL_T2 in overall.index else float("nan")
    print(f"axial levels within +-1 slice: {axial:.4f}   (target >= 0.98)")
    print(f"median point error: {errors['error_mm'].median():.2f} mm   (target <= 2 mm; "
          f"{len(errors)} test points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
