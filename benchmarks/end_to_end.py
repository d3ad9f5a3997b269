"""Benchmark: unseen studies end to end (localizer -> crops -> classifier), against the
ground-truth crops of the same studies and against the class-weighted prior.

Synthesizes a training set and a test set from different seeds (both with labels and
coordinates), trains the CPU-sized classifier (``configs/demo.yaml``) of each benchmarked
condition and the CPU localizer (``configs/localizer.yaml``: all three series types, as a
user trains it; the Sagittal T2/STIR discs are located with the Sagittal T1 vote whatever
the condition), predicts the test studies with ``spinegrade predict``'s engine and prints:

* the classifier's weighted log loss on ground-truth crops of the test studies (the run's
  calibration applied, as ``evaluate`` does; uncalibrated in brackets), per condition and
  pooled per condition group as the competition pools them (left and right together);
* the end-to-end competition score per condition group, and the class-weighted prior's
  (prior x [1, 2, 4] of the training labels per column: ``competition.prior_submission``);
* the localisation summary ``predict`` writes on a labelled split
  (``<stem>_localization.csv``, ``engine/localization_check.py``): per series type and level
  the median and p90 error, slice accuracy and the wrong-disc rate (the share of predicted
  points closer, in patient mm, to another level's true point than to their own);
* per benchmarked group other than spinal, ``e2e/prior <group>: X`` and ``e2e/gt <group>:
  Y``; last, ``e2e/prior: X`` and ``e2e/gt: Y`` for the spinal group (end-to-end spinal
  score over the prior's, and over the spinal loss on ground-truth crops).

Each stage leaves a ``.done-<stage>.json`` marker in ``--out``; a rerun skips finished
stages (delete a marker to redo one; ``--redo predict`` redoes prediction and scoring).

    python benchmarks/end_to_end.py [--out e2e_bench] [--train-studies 80] [--test-studies 20]
        [--conditions spinal_canal_stenosis | foraminal | subarticular | all]
        [--classifier-set train.epochs=32]
        [--localizer-set localizer.epochs=4] [--localizer-run RUN]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from spinegrade.competition import (
    competition_score,
    condition_score,
    prior_submission,
    solution_from_train,
)
from spinegrade.config import load_config
from spinegrade.constants import CLASS_PROB_COLUMNS, CONDITION_GROUPS, CONDITIONS
from spinegrade.engine.run_folder import PREDICTIONS_FILE

GROUP_PARTS = ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score")
# The condition groups whose ratios are printed, spinal last (the two last lines).
RATIO_GROUPS = ("foraminal", "subarticular", "spinal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="e2e_bench", help="working folder (default e2e_bench)")
    p.add_argument("--train-studies", type=int, default=80)
    p.add_argument("--test-studies", type=int, default=20)
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--test-seed", type=int, default=2)
    p.add_argument("--balance", default="0.5,0.3,0.2",
                   help="synthetic class balance of every condition, both sets "
                        "(as `spinegrade demo`; 'real' keeps the real balance)")
    p.add_argument("--max-matrix", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--conditions", nargs="+", default=["spinal_canal_stenosis"],
                   choices=[*CONDITIONS, *RATIO_GROUPS, "all"],
                   help="conditions to train classifiers for: names, groups (foraminal = "
                        "both sides) or all")
    p.add_argument("--classifier-config", default="demo")
    p.add_argument("--classifier-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--localizer-config", default="localizer")
    p.add_argument("--localizer-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--localizer-run", default=None,
                   help="use this trained localizer run instead of training one")
    p.add_argument("--predict-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--redo", nargs="*", default=[], help="stages to run again")
    args = p.parse_args(argv)
    args.conditions = expand_conditions(args.conditions)
    return args


def expand_conditions(names: list[str]) -> list[str]:
    """Condition names, with group names (and ``all``) replaced by their conditions."""
    groups = {**{g: list(CONDITION_GROUPS[g]) for g in RATIO_GROUPS}, "all": list(CONDITIONS)}
    out = [c for n in names for c in groups.get(n, [n])]
    return list(dict.fromkeys(out))


def stage(out: Path, name: str, fn: Callable[[], dict[str, Any]], redo: list[str]
          ) -> dict[str, Any]:
    """Run ``fn`` unless ``out/.done-<name>.json`` exists; record its result and seconds."""
    marker = out / f".done-{name}.json"
    if marker.is_file() and name not in redo:
        info = json.loads(marker.read_text())
        print(f"[{name}] done before ({info['seconds']:.0f} s)", flush=True)
        return info
    print(f"[{name}] ...", flush=True)
    start = time.perf_counter()
    info = {**fn(), "seconds": time.perf_counter() - start}
    marker.write_text(json.dumps(info, indent=2, default=str))
    print(f"[{name}] {info['seconds']:.0f} s", flush=True)
    return info


def synthesize(out: Path, n: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """A labelled dataset (train.csv, coordinates, train_images/) of ``n`` studies."""
    from spinegrade.data.synthetic import SynthOptions, generate

    balance = None
    if args.balance != "real":
        weights = tuple(float(v) for v in args.balance.split(","))
        # Every condition, benchmarked or not: runs on other conditions can share the data.
        balance = {c: weights for c in CONDITIONS}
    generate(out, n, seed, n_test=0, class_balance=balance, progress=False,
             workers=args.workers, overwrite=True,
             options=SynthOptions(max_matrix=args.max_matrix))
    return {"data": str(out)}


def train_classifier(out: Path, data: Path, condition: str, args: argparse.Namespace
                     ) -> dict[str, Any]:
    from spinegrade.data.prepare import prepare
    from spinegrade.engine.train import fit

    cfg = load_config(args.classifier_config,
                      [f"data.condition={condition}", *args.classifier_set])
    cache = prepare(data, out / "cache_train", dataclasses.asdict(cfg.data), workers=args.workers,
                    progress=False)
    run = out / f"clf_{condition}"
    summary = fit(cfg, cache, run, resume=True)
    return {"run": str(run), "final_checkpoint": summary.get("final_checkpoint", "best")}


def train_localizer(out: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    from spinegrade.engine.localizer import train_localizer as fit_localizer

    cfg = load_config(args.localizer_config, args.localizer_set)
    run = out / "localizer"
    table = fit_localizer(cfg, data, run, resume=True, progress=False)
    print(table.to_string(index=False), flush=True)
    return {"run": str(run)}


def ground_truth_loss(out: Path, test: Path, run: Path, args: argparse.Namespace
                      ) -> dict[str, Any]:
    """The run scored on crops around the test studies' true coordinates."""
    from spinegrade.data.prepare import prepare
    from spinegrade.engine.evaluate import evaluate_run

    cfg = load_config(run / "config.yaml")
    cache = prepare(test, out / "cache_test", dataclasses.asdict(cfg.data), workers=args.workers,
                    progress=False)
    final = json.loads((run / "final.json").read_text())["final_checkpoint"]
    out_dir = out / f"gt_{cfg.data.condition}"
    m = evaluate_run(run, cache=cache, checkpoint=final, tta=cfg.eval.tta, out_dir=out_dir)
    cal = m["calibration"]
    return {"condition": cfg.data.condition, "predictions": str(out_dir / PREDICTIONS_FILE),
            "weighted_logloss": m["weighted_logloss"],
            "competition": m["competition"],
            "uncalibrated_weighted_logloss": cal.get("uncalibrated_weighted_logloss",
                                                     m["weighted_logloss"]),
            "uncalibrated_competition_score": cal.get("uncalibrated_competition_score",
                                                      m["competition_score"])}


def run_predict(out: Path, test: Path, runs: list[str], localizer: str,
                args: argparse.Namespace) -> dict[str, Any]:
    from spinegrade.engine.predict import predict

    cfg = load_config(args.classifier_config, ["predict.figures=false", *args.predict_set])
    res = predict(runs, localizer, out / "predict" / "submission.csv", cfg.predict,
                  data_dir=test, split="train", progress=False)
    return {k: str(v) for k, v in res.files.items()}


# --- the report --------------------------------------------------------------------------------


def score_table(out: Path, train: Path, test: Path) -> tuple[dict, dict]:
    """End-to-end and class-weighted-prior competition parts on the test studies."""
    solution = solution_from_train(pd.read_csv(test / "train.csv"))
    sub = pd.read_csv(out / "predict" / "submission.csv")
    study_ids = pd.read_csv(test / "train.csv")["study_id"].dropna().astype(int)
    prior = prior_submission(pd.read_csv(train / "train.csv"), study_ids, reweight=True,
                             smooth=True)
    return competition_score(solution, sub), competition_score(solution, prior)


def pooled_ground_truth(gt: dict[str, dict]) -> dict:
    """Competition parts of all ground-truth-crop predictions together (groups pooled)."""
    frames = [pd.read_csv(g["predictions"]).assign(condition=g["condition"]) for g in gt.values()]
    df = pd.concat(frames, ignore_index=True)
    probs = df[list(CLASS_PROB_COLUMNS)].to_numpy()
    return condition_score(df["study_id"].tolist(), df["level"].tolist(), df["label"].tolist(),
                           probs, df["condition"].tolist())


def ratio_lines(e2e: dict, prior: dict, pooled_gt: dict, conditions: list[str]) -> list[str]:
    """``e2e/prior`` and ``e2e/gt`` of each group whose conditions were all benchmarked."""
    lines = []
    for group in RATIO_GROUPS:
        if not all(c in conditions for c in CONDITION_GROUPS[group]):
            continue
        name = "" if group == "spinal" else f" {group}"
        lines += [f"e2e/prior{name}: {e2e[group] / prior[group]:.3f}",
                  f"e2e/gt{name}: {e2e[group] / pooled_gt[group]:.3f}"]
    return lines


def report(gt: dict[str, dict], e2e: dict, prior: dict, wrong: pd.DataFrame,
           times: dict[str, float]) -> None:
    print("\n=== end to end on unseen synthetic studies ===")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    for cond, g in gt.items():
        comp = g["competition"]
        print(f"ground-truth crops, {cond}: weighted log loss {g['weighted_logloss']:.4f} "
              f"(uncalibrated {g['uncalibrated_weighted_logloss']:.4f}); competition parts "
              + ", ".join(f"{k} {v:.4f}" for k, v in comp.items()
                          if k in GROUP_PARTS and isinstance(v, float) and v == v))
    print("\n| | " + " | ".join(GROUP_PARTS) + " |")
    print("|---|" + "---|" * len(GROUP_PARTS))
    for name, s in (("end to end", e2e), ("class-weighted prior", prior)):
        print(f"| {name} | " + " | ".join(f"{s[k]:.4f}" for k in GROUP_PARTS) + " |")
    pooled = pooled_ground_truth(gt)
    print("ground-truth crops, pooled per group: " + ", ".join(
        f"{k} {pooled[k]:.4f}" for k in RATIO_GROUPS if pooled[k] == pooled[k]))
    print("\nlocalisation against the test labels (predict's localization summary):")
    print(wrong.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\n" + "\n".join(ratio_lines(e2e, prior, pooled, [g["condition"] for g in gt.values()])))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = out / "train_data", out / "test_data"
    times: dict[str, float] = {}

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        info = stage(out, name, fn, args.redo)
        times[name] = info["seconds"]
        return info

    run("synth_train", lambda: synthesize(train, args.train_studies, args.train_seed, args))
    run("synth_test", lambda: synthesize(test, args.test_studies, args.test_seed, args))
    runs = [run(f"train_{c}", lambda c=c: train_classifier(out, train, c, args))["run"]
            for c in args.conditions]
    loc = args.localizer_run or run("train_localizer",
                                    lambda: train_localizer(out, train, args))["run"]
    gt = {Path(r).name[len("clf_"):]: run(f"gt_{Path(r).name}",
                                          lambda r=r: ground_truth_loss(out, test, Path(r), args))
          for r in runs}
    files = run("predict", lambda: run_predict(out, test, runs, loc, args))
    e2e, prior = score_table(out, train, test)
    summary = files.get("localization")
    wrong = pd.read_csv(summary) if summary and Path(summary).is_file() else pd.DataFrame()
    report(gt, e2e, prior, wrong, times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
