"""``spinegrade cv``: train every condition x fold (x seed) and report the cross-validated score."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spinegrade.cli import add_config_args
from spinegrade.constants import TRAIN_CSV
from spinegrade.errors import UserError

EXAMPLES = """\
examples:
  spinegrade cv --data DATA --out cv                      # v8, all conditions, 5 folds
  spinegrade cv --data DATA --out cv --config demo --folds 3 --conditions spinal_canal_stenosis
  spinegrade cv --data DATA --out cv --seeds 3            # three seeds on the same folds
  # a cluster job array: caches first, one unit per job, then collect
  spinegrade cv --data DATA --out cv --prepare-only
  spinegrade cv --data DATA --out cv --only spinal_canal_stenosis:0     # job 0, 1, ...
  spinegrade cv --data DATA --out cv --collect
  spinegrade score --from-train DATA/train.csv cv/oof.csv               # = cv.json's total
  spinegrade predict --ensemble cv/ensemble.yaml --localizer LOC DATA --out submission.csv
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cv", help="cross-validate every condition x fold: oof.csv, score with intervals, ensemble",
        description=(
            "Prepare each condition's crop cache (reusing complete ones), train every condition\n"
            "x fold (x seed) into OUT/runs/ (finished runs are reused, killed ones resume), and\n"
            "write OUT/oof.csv (one out-of-fold prediction per labelled row of DATA/train.csv, in\n"
            "the submission format), cv.json and cv.md (the competition score's four parts and\n"
            "total with 95%% bootstrap intervals over studies; per condition final and best-epoch\n"
            "BA, per-class recall and weighted log loss as mean +- std over folds; the calibration\n"
            "fitted out of fold), ensemble.yaml (for predict --ensemble) and report.html (the\n"
            "folds side by side). With several visible GPUs, units run in parallel, one per GPU.\n"
            "The fold split comes from data.split_seed; --seeds N trains train.seed .. +N-1 on it."
        ),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="RSNA-format dataset (train.csv, images)")
    p.add_argument("--out", required=True, type=Path, help="CV folder to write (resumable)")
    add_config_args(p)
    p.add_argument("--preset", default=None, metavar="YAML",
                   help="YAML laid over the config, e.g. ablate-demo for a CPU-sized run")
    p.add_argument("--conditions", nargs="+", default=["all"], metavar="NAME",
                   help="'all' (default) or condition names")
    p.add_argument("--folds", type=int, default=None, help="number of folds (default data.folds)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per fold (default 1)")
    p.add_argument("--localizer", default=None, metavar="LOC",
                   help="localizer run recorded in ensemble.yaml for predict --ensemble")
    p.add_argument("--only", nargs="+", default=None, metavar="CONDITION:FOLD[:SEED]",
                   help="train only these units (e.g. one per cluster job); then --collect")
    p.add_argument("--collect", action="store_true",
                   help="write the results from finished units (with --only: after training them)")
    p.add_argument("--prepare-only", action="store_true", help="prepare the caches and stop")
    p.add_argument("--cache-root", type=Path, default=None,
                   help="where the crop caches live (default OUT/cache); complete ones are reused")
    p.add_argument("--workers", type=int, default=1, help="processes for prepare (default 1)")
    p.add_argument("--gpus", type=int, default=None,
                   help="units run in parallel, one per GPU (default: the visible CUDA devices)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.set_defaults(func=run)


def _print_summary(summary: dict, folder) -> None:
    sc = summary["score"]
    t = sc["total"]
    print(f"\ncross-validated score {t['estimate']:.6f} [95% {t['low']:.4f}, {t['high']:.4f}] "
          f"over {sc['n_studies']} studies ({summary['n_rows_model']}/{summary['n_rows']} rows "
          "by a model)")
    for cond, s in summary["per_condition"].items():
        fb, bb = s["final_ba"], s["best_epoch_ba"]
        print(f"  {cond}: final BA {fb['mean']:.3f} ± {fb['std']:.3f}; "
              f"best-epoch BA {bb['mean']:.3f} ± {bb['std']:.3f} (optimistic)")
    print(f"wrote {folder.oof}, {folder.cv_json}, {folder.cv_md}, {folder.ensemble}, {folder.report}")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the engine loads torch, which `spinegrade --help` need not.
    from spinegrade.engine import cv
    from spinegrade.engine.cv_results import collect

    if not (args.data / TRAIN_CSV).is_file():
        raise UserError(f"--data {args.data}: no train.csv there (an RSNA-format dataset is needed)")
    if args.localizer is not None and not Path(args.localizer).is_dir():
        raise UserError(f"--localizer {args.localizer}: not a folder (a train-localizer run)")
    start = time.perf_counter()
    folder = cv.CvFolder(args.out)
    units = cv.plan_units(args.config, args.conditions, args.out, folds=args.folds,
                          seeds=args.seeds, preset=args.preset, overrides=args.overrides)
    localizer = str(Path(args.localizer).resolve()) if args.localizer else None
    cv.write_plan(folder, data_dir=args.data, config=args.config, preset=args.preset,
                  overrides=args.overrides, units=units, localizer=localizer)
    train_now = not (args.collect and args.only is None)
    if train_now:
        chosen = cv.select_units(units, args.only) if args.only else units
        caches = cv.prepare_caches(chosen, args.data, args.cache_root or folder.cache, args.workers)
        if args.prepare_only:
            print(f"caches ready: {', '.join(str(c) for c in caches.values())}")
            return 0
        rows = cv.train_units(chosen, caches, gpus=args.gpus, logs=folder.logs)
        trained = sum(r["status"] != "reused" for r in rows)
        print(f"{trained} unit(s) trained, {len(rows) - trained} reused", flush=True)
        if args.only and not args.collect:
            print(f"done: {', '.join(u.tag for u in chosen)}; when every unit is done run the same "
                  "command with --collect instead of --only")
            return 0
    missing = cv.unfinished(units)
    if missing:
        raise UserError(f"{len(missing)} of {len(units)} units are not finished: "
                        f"{', '.join(u.tag for u in missing[:8])}{' ...' if len(missing) > 8 else ''}"
                        "; train them (--only CONDITION:FOLD:SEED, or without --only) first")
    summary = collect(units, args.data, folder, localizer=localizer, n_boot=args.n_boot)
    _print_summary(summary, folder)
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0
