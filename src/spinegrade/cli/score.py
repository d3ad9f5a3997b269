"""``spinegrade score``: score a submission CSV with the exact competition metric."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from spinegrade.competition import (
    SCORE_PARTS,
    check_normalised,
    competition_score,
    solution_from_train,
)
from spinegrade.constants import ANY_SEVERE_SPINAL
from spinegrade.errors import UserError

EXAMPLES = """\
examples:
  spinegrade score solution.csv submission.csv
  spinegrade score --from-train data/train.csv submission.csv --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="score a submission CSV with the competition metric",
        description=(
            "Compute the RSNA 2024 Lumbar Spine score of SUBMISSION.csv (row_id, normal_mild,\n"
            "moderate, severe): the mean of the sample-weighted (1/2/4) log losses of the\n"
            "spinal, foraminal and subarticular groups and of the per-study any-severe-spinal\n"
            "term. Prints each part with its row count, then 'score: VALUE'. Lower is better.\n"
            "Submission rows not in the solution are ignored (e.g. the empty train cells).\n"
            "Rows need not sum to one (they are renormalised, as in the competition), but an\n"
            "all-zero row or a value above 1 is refused unless --allow-unnormalised."
        ),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "solution", nargs="?", metavar="SOLUTION.csv",
        help="solution CSV: row_id, one-hot normal_mild/moderate/severe, sample_weight "
             "(rows with weight 0 or empty labels are unscored); omit with --from-train",
    )
    p.add_argument(
        "submission", metavar="SUBMISSION.csv",
        help="submission CSV covering every solution row; probabilities need not sum to one",
    )
    p.add_argument(
        "--from-train", metavar="TRAIN.csv",
        help="build the solution from a train.csv (labels one-hot, weights 1/2/4 by "
             "severity, empty cells unscored) instead of giving SOLUTION.csv",
    )
    p.add_argument(
        "--json", action="store_true",
        help="print one JSON object (each part, 'score', 'n_scored', 'n_ignored_rows') "
             "instead of the table",
    )
    p.add_argument(
        "--allow-unnormalised", action="store_true",
        help="score all-zero rows and values above 1 too (the competition renormalised "
             "every row after clipping)",
    )
    p.set_defaults(func=run)


def read_csv(path: str | Path, what: str, **kwargs) -> pd.DataFrame:
    """Read a CSV, turning a missing, empty or malformed file into a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} CSV {path}: {e}") from e


def run(args: argparse.Namespace) -> int:
    if (args.solution is None) == (args.from_train is None):
        raise UserError("give exactly one of SOLUTION.csv or --from-train TRAIN.csv "
                        "(then SUBMISSION.csv)")
    if args.from_train is not None:
        solution = solution_from_train(read_csv(args.from_train, "train"))
    else:
        solution = read_csv(args.solution, "solution", dtype={"row_id": str})
    submission = read_csv(args.submission, "submission", dtype={"row_id": str})
    try:
        if not args.allow_unnormalised:
            check_normalised(submission)
        result = competition_score(solution, submission)
    except UserError as e:
        raise UserError(f"{args.submission}: {e}") from e
    if args.json:
        # JSON has no NaN: a part with nothing to score is written as null.
        plain = {k: None if isinstance(v, float) and math.isnan(v) else v
                 for k, v in result.items()}
        print(json.dumps(plain, indent=2))
        return 0
    width = max(map(len, SCORE_PARTS))
    for part in SCORE_PARTS:
        unit = "studies" if part == ANY_SEVERE_SPINAL else "rows"
        print(f"{part:<{width}}  {result[part]:.6f}  (n={result['n_scored'][part]} {unit})")
    print(f"score: {result['score']:.6f}")
    return 0
