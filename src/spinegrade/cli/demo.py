"""``spinegrade demo``: synthetic data -> crop cache -> training -> evaluation -> report, on CPU.

Each stage records a ``.done-<stage>.json`` marker in the output folder; rerunning the demo
skips finished stages (an interrupted training resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spinegrade.cli import add_config_args
from spinegrade.config import load_config
from spinegrade.io.atomic import atomic_write_text
from spinegrade.io.paths import check_output_dir

STAGES = ("synth", "prepare", "train", "evaluate", "report")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end CPU demo on synthetic data (about 10 minutes on 2 cores)",
        description=(
            "Generate a synthetic RSNA-format dataset, prepare its crop cache, train the v8 "
            "recipe on a tiny backbone (configs/demo.yaml), evaluate it and write report.html. "
            "Rerunning skips the stages already finished."
        ),
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--studies", type=int, default=150, help="synthetic training studies (150)")
    p.add_argument("--workers", type=int, default=2, help="processes for synth and prepare (2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (0)")
    p.add_argument("--balance", type=_balance, default=(0.5, 0.3, 0.2), metavar="N,M,S",
                   help="class balance of the synthetic labels of data.condition (default "
                        "0.5,0.3,0.2: more Moderate/Severe than the real 88/7/5, so a "
                        "10-minute CPU run sees enough of them; 'real' keeps the real balance)")
    p.add_argument("--max-matrix", type=int, default=256,
                   help="cap on synthetic image rows/columns, for speed (default 256)")
    add_config_args(p, default="demo", example="train.seed=1")
    p.set_defaults(func=run)


def _balance(text: str) -> tuple[float, float, float] | None:
    if text == "real":
        return None
    try:
        n, m, sev = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected three numbers like 0.5,0.3,0.2, or 'real'") from None
    return n, m, sev


def _stage(out: Path, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage unless its marker exists; print what happens and how long it took."""
    marker = out / f".done-{name}.json"
    k = STAGES.index(name) + 1
    if marker.is_file():
        info = json.loads(marker.read_text())
        print(f"[{k}/{len(STAGES)}] {name}: done before ({info['seconds']:.0f} s), skipped",
              flush=True)
        return info
    print(f"[{k}/{len(STAGES)}] {name} ...", flush=True)
    start = time.perf_counter()
    info = {**fn(), "seconds": time.perf_counter() - start}
    atomic_write_text(marker, json.dumps(info, indent=2))
    print(f"[{k}/{len(STAGES)}] {name}: {info['seconds']:.0f} s", flush=True)
    return info


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = check_output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, cache_root, run_dir = out / "data", out / "cache", out / "run"
    times: dict[str, float] = {}
    # Each stage imports its engine on first use: `spinegrade --help` need not load torch.

    def synth() -> dict[str, Any]:
        from spinegrade.data.synthetic import SynthOptions, generate

        balance = {cfg.data.condition: args.balance} if args.balance else None
        # A half-finished dataset from a killed run is regenerated (same seed, same files).
        # Two test studies only: the demo scores its validation fold, not the test set.
        summary = generate(data, args.studies, args.seed, n_test=2, class_balance=balance,
                           progress=True, workers=args.workers, overwrite=True,
                           options=SynthOptions(max_matrix=args.max_matrix))
        return {"data": str(data), "grade_counts": summary.grade_counts[cfg.data.condition]}

    def prepare() -> dict[str, Any]:
        from spinegrade.data.prepare import prepare as prepare_cache

        settings = dataclasses.asdict(cfg.data)
        return {"cache": str(prepare_cache(data, cache_root, settings, workers=args.workers))}

    def train() -> dict[str, Any]:
        from spinegrade.engine.run_folder import RunFolder
        from spinegrade.engine.train import fit

        final = RunFolder(run_dir).final
        if final.is_file():  # finished before its stage marker was written: keep it
            return json.loads(final.read_text())
        return fit(cfg, cache_dir, run_dir)

    def evaluate() -> dict[str, Any]:
        from spinegrade.engine.evaluate import evaluate_run

        return evaluate_run(run_dir, checkpoint=final_ckpt, tta=cfg.eval.tta)

    def report() -> dict[str, Any]:
        from spinegrade.report import build_report

        return {"report": str(build_report(run_dir).resolve())}

    start = time.perf_counter()
    times["synth"] = _stage(out, "synth", synth)["seconds"]
    info = _stage(out, "prepare", prepare)
    cache_dir, times["prepare"] = info["cache"], info["seconds"]
    info = _stage(out, "train", train)
    final_ckpt, times["train"] = info.get("final_checkpoint", "best"), info["seconds"]
    ev = _stage(out, "evaluate", evaluate)
    times["evaluate"] = ev["seconds"]
    rep = _stage(out, "report", report)
    times["report"] = rep["seconds"]
    _print_summary(ev, rep["report"], times, time.perf_counter() - start, final_ckpt)
    return 0


def _print_summary(ev: dict, report: str, times: dict[str, float], wall: float, ckpt: str) -> None:
    recall = ", ".join(f"{k} {v:.3f}" for k, v in ev["recall"].items() if v is not None)
    dead = [k for k, v in ev["prediction_counts"].items() if v == 0]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    print("\n=== spinegrade demo ===")
    print(f"stage times: {stages} (this invocation: {wall:.0f} s)")
    print(f"final model ({ckpt} checkpoint) on the validation fold, "
          f"{'TTA' if ev['tta'] else 'no TTA'}, {ev['n_samples']} samples: "
          f"balanced accuracy {ev['balanced_accuracy']:.3f}; "
          f"recall {recall}; weighted log loss {ev['weighted_logloss']:.3f}")
    print(f"dead classes: {', '.join(dead) if dead else 'none'}")
    print(f"report: {report}")
