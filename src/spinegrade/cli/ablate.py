"""``spinegrade ablate``: the v4-v8 comparison table and one-factor ablations of v8."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spinegrade.errors import UserError
from spinegrade.io.paths import check_output_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate", help="train several configs on the same folds and tabulate the comparison",
        description=(
            "Train each config on the same folds and seeds (reusing finished runs), then write "
            "table.md / table.csv (Version, Architecture, Loss, Best BA and final-model BA as "
            "mean±std over folds x seeds, epoch of best BA, dead classes, per-class recall at "
            "the best epoch, weighted log loss, and the paired difference of final BA and "
            "weighted log loss to the reference version with a 95% bootstrap interval over the "
            "shared validation studies, marked (≈ 0) when it contains zero) and curves.png "
            "(BA and per-class recall per epoch for every version)."),
    )
    p.add_argument("--cache", required=True, type=Path,
                   help="crop cache made by 'prepare', or a folder of caches (one per set of "
                        "data settings: v4-v7 crop differently from v8)")
    p.add_argument("--data", type=Path, default=None, metavar="DATA",
                   help="RSNA-format data folder: prepare each version's missing cache into "
                        "--cache from it (resumable, reused on reruns)")
    p.add_argument("--workers", type=int, default=1, help="processes for preparing caches (1)")
    p.add_argument("--configs", nargs="*", default=[], metavar="YAML",
                   help="configs to compare, e.g. configs/v4.yaml ... configs/v8.yaml")
    p.add_argument("--out", required=True, type=Path, help="output folder (runs/ + tables)")
    p.add_argument("--folds", default="0", help="comma-separated fold indices (default: 0)")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per fold: train.seed .. +N-1 (default 1); the folds "
                        "come from data.split_seed, the same for every seed")
    p.add_argument("--reference", default="v8",
                   help="version the paired differences are taken against (default v8; the "
                        "first config when it is not among them)")
    p.add_argument("--preset", default=None, metavar="YAML",
                   help="YAML laid over every config, e.g. ablate-demo.yaml for a CPU-sized run")
    p.add_argument("--one-factor", default=None, metavar="YAML",
                   help="also run one-factor ablations of this config (sampler, loss, "
                        "aggregator, level conditioning, mixup, head-bias init, freeze, SWA)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override applied to every config")
    p.set_defaults(func=run)


def _parse_folds(text: str) -> list[int]:
    try:
        folds = [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise UserError(f"--folds must be comma-separated integers, got '{text}'") from None
    if not folds:
        raise UserError("--folds is empty")
    return folds


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the engine loads torch, which `spinegrade --help` need not.
    from spinegrade.engine import ablate
    from spinegrade.engine.train import fit

    if not args.configs and not args.one_factor:
        raise UserError("nothing to compare: give --configs and/or --one-factor")
    if not args.cache.exists() and args.data is None:
        raise UserError(f"cache not found: {args.cache} (make one with 'spinegrade prepare', "
                        "or pass --data DATA to prepare it here)")
    check_output_dir(args.out)
    start = time.perf_counter()
    runs = ablate.plan_runs(args.configs, _parse_folds(args.folds), args.out,
                            preset=args.preset, overrides=args.overrides,
                            one_factor=args.one_factor, seeds=args.seeds)

    def train_fn(cfg, cache, run_dir, fold):
        fit(cfg, cache, run_dir, resume=True)

    ablate.execute(runs, lambda cfg: ablate.cache_for(cfg, args.cache, args.data, args.workers),
                   train_fn)
    table = ablate.write_outputs(runs, args.out, args.reference)
    print()
    print(ablate.to_markdown(table))
    print(f"wrote {args.out / ablate.TABLE_MD}, {args.out / ablate.TABLE_CSV}, "
          f"{args.out / ablate.CURVES_PNG} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0
