"""``spinegrade predict``: localise, crop and grade new studies into a submission CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from spinegrade.cli import add_config_args
from spinegrade.config import config_to_yaml, load_config
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_write_text
from spinegrade.io.paths import check_output_file

EXAMPLES = """\
examples:
  spinegrade predict --classifier runs/spinal --localizer runs/loc data/ --out submission.csv
  spinegrade predict --classifier runs/spinal_f0:0.6 --classifier runs/spinal_f1:0.4 \\
      --localizer runs/loc data/ --out submission.csv
  spinegrade predict --classifier runs/spinal --localizer runs/loc --study data/test_images/123
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="grade new studies (localise levels, crop, classify) into a submission",
        description=(
            "Read DATA_DIR/test_series_descriptions.csv and DATA_DIR/test_images/ (or, with\n"
            "--study, one study folder of DICOM series whose types come from SeriesDescription),\n"
            "locate every disc level with the --localizer run, crop around it exactly as each\n"
            "classifier run was trained (its own data config), classify with TTA and write one\n"
            "row per study x condition x level (row_id, normal_mild, moderate, severe; rows sum\n"
            "to 1). Runs of the same condition are averaged in probability space, weighted by\n"
            "RUN:WEIGHT. Conditions without a classifier and levels that cannot be located get\n"
            "prior probabilities (from the run's training labels, else the real class balance),\n"
            "with a warning. Beside the submission, named after it: <stem>_problems.csv,\n"
            "<stem>_locations.csv, <stem>_studies.csv (per-study seconds), <stem>_config.yaml\n"
            "and <stem>_figures/<study>.png; on a labelled split (--split train) also\n"
            "<stem>_localization.csv: wrong-disc rate, point error and slice accuracy per series\n"
            "type and level against train_label_coordinates.csv. --study on a folder without a\n"
            "readable series is an error."
        ),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, example="predict.batch_size=8")
    p.add_argument("data_dir", nargs="?", metavar="DATA_DIR",
                   help="dataset folder with test_series_descriptions.csv and test_images/")
    p.add_argument("--study", metavar="DIR",
                   help="predict one study folder (series sub-folders, no CSV) and print its grades")
    p.add_argument("--classifier", action="append", default=[], metavar="RUN[:WEIGHT]",
                   help="classifier run folder, optionally with a weight (repeatable)")
    p.add_argument("--ensemble", metavar="FILE",
                   help="ensemble.yaml of 'spinegrade cv': its runs and weights, as if each were "
                        "given with --classifier RUN:WEIGHT (and its localizer, if it names one)")
    p.add_argument("--localizer", metavar="RUN",
                   help="run folder of 'spinegrade train-localizer' (required unless --ensemble "
                        "names one)")
    p.add_argument("--out", default=None,
                   help="submission CSV to write (default: submission.csv, or "
                        "<study>_submission.csv with --study)")
    p.add_argument("--split", default="test", choices=("test", "train"),
                   help="which CSV and images folder of DATA_DIR to read (default: test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the engine loads torch, which `spinegrade --help` need not.
    from spinegrade.engine.predict import grade_table, predict
    from spinegrade.engine.run_folder import config_copy, default_submission

    if (args.data_dir is None) == (args.study is None):
        raise UserError("give either DATA_DIR or --study DIR (not both)")
    cfg = load_config(args.config, args.overrides)
    out = args.out or default_submission(args.study)
    check_output_file(out)
    classifiers, localizer = _classifiers_and_localizer(args)
    result = predict(classifiers, localizer, out, cfg.predict, data_dir=args.data_dir,
                     study_dir=args.study, split=args.split, progress=not args.no_progress)
    atomic_write_text(config_copy(Path(out)), config_to_yaml(cfg))
    if args.study:
        res = result.results[0]
        print(f"study {res.study_id} ({res.seconds:.1f} s):")
        print(grade_table(res).to_string(index=False))
    n_prior = sum(r.source[k] != "model" for r in result.results for k in r.source)
    print(f"wrote {result.files['submission']} ({len(result.submission)} rows, "
          f"{len(result.results)} studies; {n_prior} rows from priors; "
          f"{len(result.problems)} problems in {result.files['problems']})")
    return 0


def _classifiers_and_localizer(args: argparse.Namespace) -> tuple[list[str], str]:
    """--classifier specs plus the runs of --ensemble; --localizer, else the ensemble's."""
    from spinegrade.engine.ensemble import classifier_specs, read_ensemble

    specs, localizer = list(args.classifier), args.localizer
    if args.ensemble:
        ensemble = read_ensemble(args.ensemble)
        specs += classifier_specs(ensemble)
        localizer = localizer or ensemble.localizer
    if not localizer:
        raise UserError("give --localizer RUN (the ensemble names none)")
    return specs, localizer
