"""``spinegrade train``: train one fold of a crop cache into a run folder."""

from __future__ import annotations

import argparse

from spinegrade.cli import add_config_args
from spinegrade.config import load_config
from spinegrade.io.paths import check_output_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train the grader on one fold of a prepared crop cache",
        description=(
            "Train on a crop cache (from 'spinegrade prepare') with the phases of the config: "
            "frozen backbone, cosine fine-tuning, SWA. Writes config.yaml, split.csv, "
            "metrics.csv, health.json, tb/, checkpoints/{best,last,swa}.pt, oof.csv and "
            "report.html into --out. Multi-GPU: torchrun --nproc_per_node=N -m spinegrade.cli "
            "train ... (batch_size is per process)."
        ),
    )
    add_config_args(p)
    p.add_argument("--cache", required=True, help="crop cache folder (or its parent)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--fold", type=int, default=None,
                   help="validation fold, 0-based (default: data.fold of the config)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its checkpoints/last.pt (the same command "
                        "without it also resumes an unfinished run of the same config and cache)")
    p.add_argument("--restart", action="store_true",
                   help="replace the run in OUT: remove all of its outputs, then train from "
                        "epoch 1 (a finished run, or one of another config, is otherwise refused)")
    p.set_defaults(func=run, resume_flag="--resume", restart_flag="--restart")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the engine loads torch, which `spinegrade --help` need not.
    from spinegrade.engine.train import fit

    overrides = list(args.overrides)
    if args.fold is not None:
        overrides.append(f"data.fold={args.fold}")
    cfg = load_config(args.config, overrides)
    check_output_dir(args.out)
    fit(cfg, args.cache, args.out, resume=args.resume, restart=args.restart)
    return 0
