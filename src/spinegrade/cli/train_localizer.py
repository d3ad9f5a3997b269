"""``spinegrade train-localizer``: learn where each disc level is, per series type."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from spinegrade.cli import add_config_args

    p = sub.add_parser(
        "train-localizer", help="train the stage-1 level localizer on label coordinates",
        description=(
            "Learn from train_label_coordinates.csv which slice and which (x, y) holds each "
            "disc level, for each series type in localizer.series (Sagittal T2/STIR: spinal "
            "canal; Sagittal T1: left/right foramina; Axial T2: left/right subarticular "
            "recesses). Holds out localizer.val_fraction of the studies and reports, per level, "
            "the median and 90th-percentile point error in mm, the exact / +-1 slice accuracy "
            "and the wrong-disc rate (points nearer another level's disc than their own). "
            "Progress bars run within each epoch. Writes config.yaml, split.csv, localizer_metrics.csv, problems.csv and "
            "<task>/{checkpoints/{best,last}.pt, metrics.csv, val_predictions.csv, "
            "overlay.png} into --out. Run it again to resume an interrupted run."
        ),
    )
    add_config_args(p, default="localizer", example="localizer.epochs=10")
    p.add_argument("--data", required=True, help="RSNA-format training data folder")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--restart", action="store_true",
                   help="ignore checkpoints already in --out and train from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, restart_flag="--restart")


def run(args: argparse.Namespace) -> int:
    from spinegrade.config import load_config
    from spinegrade.engine.localizer import train_localizer
    from spinegrade.io.paths import check_output_dir

    cfg = load_config(args.config, args.overrides)
    check_output_dir(args.out)
    table = train_localizer(cfg, args.data, args.out, resume=not args.restart,
                            progress=not args.no_progress)
    if table.empty:
        print("no task had held-out studies to evaluate")
        return 0
    print("held-out localisation (n points; median_mm / p90_mm: point error in mm on the true "
          "slice; slice_exact / slice_within1: share on the true slice / within +-1 slice; "
          "wrong_disc_rate: share nearer another level's true disc):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0
