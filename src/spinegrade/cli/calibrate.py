"""``spinegrade calibrate``: refit a finished run's calibration without retraining."""

from __future__ import annotations

import argparse

from spinegrade.engine.run_folder import RunFolder


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="refit a trained run's calibration on its out-of-fold predictions",
        description=(
            "Refit RUN/calibration.json (temperature, optional per-class bias, prior mix) on "
            "the run's oof.csv, as training does at its end, with the run's saved config and "
            "--set overrides of eval.calibration, eval.calibration_prior_mix, "
            "eval.calibration_bins, eval.calibration_folds or predict.prior_reweight. "
            "evaluate and predict apply the new calibration; final.json and report.html are "
            "updated, the run's config.yaml is kept as trained."
        ),
    )
    p.add_argument("run", help="training run folder (the one `spinegrade train --out` made)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="how to fit, e.g. --set eval.calibration=temperature_bias (repeatable)")
    p.add_argument("--cache", default=None,
                   help="the crop cache the run was trained on, when run.json's has moved")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the engine loads torch, which `spinegrade --help` need not.
    from spinegrade.engine.calibrate import recalibrate

    rc = recalibrate(args.run, args.overrides, cache=args.cache)
    print(f"wrote {RunFolder(args.run).calibration} ({rc.method}, fitted on the {rc.checkpoint} "
          "checkpoint's out-of-fold predictions)")
    return 0
