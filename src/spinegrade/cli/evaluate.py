"""``spinegrade evaluate``: re-score a run's checkpoint (TTA on or off)."""

from __future__ import annotations

import argparse
from pathlib import Path

from spinegrade.engine.run_folder import CHECKPOINT_NAMES, RunFolder
from spinegrade.io.paths import check_output_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="re-score a trained checkpoint with test-time augmentation",
        description=(
            "Score a checkpoint of a training run on the run's validation fold (default) or on "
            "every sample of another crop cache (--cache), with TTA (brightness and scale views "
            "of eval.tta_brightness / eval.tta_scales, probabilities averaged; no flips) unless "
            "--no-tta, and with the run's calibration.json applied unless --no-calibration. "
            "Writes metrics.json, predictions.csv, confusion.png and "
            "per_level_recall.png to RUN/eval (or --out)."
        ),
    )
    p.add_argument("run", help="training run folder")
    p.add_argument("--cache", default=None,
                   help="crop cache to score entirely (default: the run's own validation fold)")
    p.add_argument("--checkpoint", choices=("final", *CHECKPOINT_NAMES), default="final",
                   help="which checkpoint of the run (default: final, the one final.json names: "
                        "SWA when it ran, else best; the model of oof.csv and of predict)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="score the plain view only")
    p.add_argument("--no-calibration", dest="calibrate", action="store_false",
                   help="score the raw probabilities (default: apply RUN/calibration.json)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the engine loads torch, which `spinegrade --help` need not.
    from spinegrade.engine.evaluate import evaluate_run

    check_output_dir(Path(args.out) if args.out else RunFolder(args.run).eval_dir)
    m = evaluate_run(args.run, cache=args.cache, checkpoint=args.checkpoint, tta=args.tta,
                     out_dir=args.out, calibrate=args.calibrate)
    recall = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a"
                       for k, v in m["recall"].items())
    ba = m["balanced_accuracy"]
    print(f"{m['checkpoint']} checkpoint (epoch {m['checkpoint_epoch']}) on {m['scored']}, "
          f"{'TTA ' + str(m['tta_views']) + ' views' if m['tta'] else 'no TTA'}: "
          f"{m['n_samples']} samples, BA {ba if ba is None else f'{ba:.4f}'}, recall {recall}, "
          f"weighted log loss {m['weighted_logloss']:.4f}")
    print(f"confusion (rows true): {m['confusion_matrix']}")
    parts = ", ".join(f"{k} {v:.4f}" for k, v in m["competition"].items()
                      if isinstance(v, float) and k != "score")
    print(f"competition metric, this condition's part(s) only, on these predictions ({parts}): "
          f"score {m['competition_score']:.4f}")
    cal = m["calibration"]
    if cal["applied"]:
        print(f"calibrated (temperature {cal['temperature']:.3f}, prior mix "
              f"{cal['prior_mix']:.3f}); uncalibrated: weighted log loss "
              f"{cal['uncalibrated_weighted_logloss']:.4f}, score "
              f"{cal['uncalibrated_competition_score']:.4f}")
    return 0
