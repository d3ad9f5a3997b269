"""``spinegrade synth``: write a synthetic dataset in the RSNA 2024 Lumbar Spine layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from spinegrade.choices import SYNTH_DIFFICULTIES
from spinegrade.constants import CONDITIONS, SEVERITIES
from spinegrade.data.synthetic import SynthOptions, generate
from spinegrade.errors import UserError
from spinegrade.io.paths import check_output_dir, check_output_file

DESCRIPTION = """\
Write a synthetic dataset with the files and columns of the RSNA 2024 Lumbar Spine
competition: train.csv, train_label_coordinates.csv, {train,test}_series_descriptions.csv,
train_images/ and test_images/ (<study>/<series>/<instance>.dcm: Sagittal T1, Sagittal
T2/STIR and Axial T2 MR DICOM series), sample_submission.csv and solution.csv for the
test studies (one-hot truth plus sample_weight 1/2/4; empty label cells are left out, as
they are unscored), and synthetic.json (seed, options, instance order of each series).
Severity is anatomy: a narrowed thecal sac at the disc (spinal), a smaller fat-filled
foramen (foraminal), an encroached lateral recess (subarticular). The same seed gives
byte-identical files."""

EPILOG = f"""\
class balance: --balance W,W,W sets the weights of ({', '.join(SEVERITIES)}) for every
condition; --balance CONDITION=W,W,W sets one condition (repeatable; later wins). Weights
are normalised. Default: the real data's balance (spinal shaped per level).
conditions: {', '.join(CONDITIONS)}
example: spinegrade synth data/synth --studies 150 --seed 0 --workers 2 --preview"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="write a synthetic RSNA-format lumbar spine MRI dataset",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (created; must be empty "
                   "unless --overwrite)")
    p.add_argument("--studies", type=int, default=150, metavar="N",
                   help="number of training studies (default: 150)")
    p.add_argument("--test-studies", type=int, default=None, metavar="M",
                   help="number of test studies (default: max(2, N // 10))")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--balance", action="append", default=[], metavar="[CONDITION=]W,W,W",
                   help="grade weights Normal/Mild,Moderate,Severe for all conditions or one "
                        "(repeatable; see below)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes generating studies in parallel (default: 1; output is "
                        "identical for any value)")
    p.add_argument("--max-matrix", type=int, default=None, metavar="PX",
                   help="cap image rows/columns at PX (coarser pixels, same field of view); "
                        "default: realistic 256-640")
    p.add_argument("--difficulty", choices=SYNTH_DIFFICULTIES, default="easy",
                   help="easy (default, the demo's data): grades barely overlap, labels exact; "
                        "realistic: neighbouring grades overlap, 10%% of labels moved to a "
                        "neighbouring grade (reader disagreement); hard: more overlap, 20%%")
    p.add_argument("--labels-only", action="store_true",
                   help="write the CSVs (same labels and coordinates) but no DICOM files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous synthetic dataset in OUT (only its own files)")
    p.add_argument("--preview", nargs="?", const="", default=None, metavar="PATH",
                   help="also save a figure of 3 studies' labelled slices (default path: "
                        "OUT/preview.png)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def parse_balance(items: list[str]) -> dict[str, tuple[float, ...]] | None:
    """``["0.6,0.25,0.15", "spinal_canal_stenosis=0.8,0.1,0.1"]`` -> condition -> weights."""
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        cond, _, text = item.rpartition("=")
        try:
            weights = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise UserError(f"--balance {item}: weights must be numbers like 0.6,0.25,0.15") from None
        if cond and cond not in CONDITIONS:
            raise UserError(f"--balance {item}: unknown condition '{cond}'; expected one of "
                            f"{', '.join(CONDITIONS)}")
        for c in [cond] if cond else CONDITIONS:
            out[c] = weights
    return out or None


def run(args: argparse.Namespace) -> int:
    if args.max_matrix is not None and args.max_matrix < 32:
        raise UserError(f"--max-matrix must be at least 32, got {args.max_matrix}")
    preview = None
    if args.preview is not None:
        preview = Path(args.preview) if args.preview else args.out / "preview.png"
    check_output_dir(args.out, "OUT")
    if preview is not None:
        check_output_file(preview, "--preview")
    summary = generate(
        args.out, args.studies, args.seed, n_test=args.test_studies,
        class_balance=parse_balance(args.balance), progress=not args.no_progress,
        workers=args.workers, overwrite=args.overwrite, preview=preview,
        options=SynthOptions(max_matrix=args.max_matrix, labels_only=args.labels_only,
                             difficulty=args.difficulty),
    )
    n = len(summary.train_ids) + len(summary.test_ids)
    print(f"wrote {len(summary.train_ids)} train + {len(summary.test_ids)} test studies, "
          f"{summary.n_series} series, {summary.n_images} images, {summary.n_coordinates} "
          f"label points to {summary.out_dir} in {summary.seconds:.1f} s "
          f"({summary.seconds / n:.2f} s/study)")
    if "preview" in summary.files:
        print(f"preview: {summary.files['preview']}")
    return 0
