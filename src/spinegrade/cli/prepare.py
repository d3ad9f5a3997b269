"""``spinegrade prepare``: DICOM series -> the crop cache training reads."""

from __future__ import annotations

import argparse
import dataclasses

from spinegrade.cli import add_config_args
from spinegrade.constants import CONDITIONS

EXAMPLES = """\
examples:
  spinegrade prepare data/ --out cache/
  spinegrade prepare data/ --out cache/ --condition left_neural_foraminal_narrowing --workers 4
  spinegrade prepare data/ --out cache/ --set data.img_size=128 --set data.window_preset=percentile
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="cut the labeled crops of a dataset into a memory-mapped cache",
        description=(
            "Read each labeled series of DATA_DIR (RSNA 2024 Lumbar Spine layout: train.csv, "
            "train_label_coordinates.csv, train_series_descriptions.csv, train_images/) once, "
            "window and equalise the slices it needs, and store every crop in "
            "CACHE/<condition>-<hash>/ (crops.npy, index.csv, problems.csv, meta.json). The "
            "hash covers every pixel setting of the config's data section, so a changed "
            "setting makes a new cache. Interrupted runs resume when run again. Files or rows "
            "that cannot be used are listed in problems.csv and never stop the run."
        ),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="RSNA-format dataset folder")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache root folder")
    p.add_argument("--condition", choices=CONDITIONS,
                   help="condition to prepare (default: the config's data.condition)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: the config's data.num_workers, at least 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p, example="data.img_size=128")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Here, not at the top: build_parser imports every command module, and the pipeline's
    # imports (pandas, OpenCV, pydicom) would slow down every other command's start.
    from spinegrade.config import load_config, save_config
    from spinegrade.data.cache import summarize
    from spinegrade.data.prepare import prepare
    from spinegrade.io.paths import check_output_dir

    overrides = list(args.overrides)
    if args.condition:
        overrides.append(f"data.condition={args.condition}")
    cfg = load_config(args.config, overrides)
    check_output_dir(args.out)
    workers = args.workers if args.workers is not None else max(1, cfg.data.num_workers)
    cache_dir = prepare(args.data_dir, args.out, dataclasses.asdict(cfg.data),
                        workers=max(1, workers), progress=not args.no_progress)
    save_config(cfg, cache_dir)  # the resolved config beside meta.json, as in every output
    print(summarize(cache_dir))
    return 0
