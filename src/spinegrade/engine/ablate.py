"""Re-run the version comparison (v4-v8) and one-factor ablations of v8 on the same folds.

Each (config, fold, seed) trains into ``OUT/runs/<label>/fold<k>`` (``fold<k>-seed<s>`` with
several seeds); a run whose metrics.csv already covers every epoch is reused, not repeated.
Versions whose crops differ (v4-v7 crop tighter and use one intensity window) need their own
crop cache: :func:`cache_for` finds the cache of each config's data settings under a cache
root, and prepares it from the data folder when it is missing. The summary table follows the
seed's form: version, architecture, loss, best BA (mean +- std over folds x seeds), epoch of
best BA, dead classes, per-class recall at the best epoch, competition-weighted log loss; plus
the BA of each run's final model (SWA when it ran; from oof.csv, the model evaluate and
predict use) and, for every version but the reference (v8), the paired difference to it on
the shared validation samples with a 95% bootstrap interval over their studies, and whether
that interval excludes zero. Every BA is on the validation fold without TTA; std is over
folds x seeds (sample std, ddof 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.bootstrap import Interval, mean_std, paired_difference
from spinegrade.config import Config, load_config
from spinegrade.constants import CLASS_NAMES, CLASS_PROB_COLUMNS
from spinegrade.data.cache import META_FILE, find_cache, resolve_cache_dir
from spinegrade.data.prepare import prepare
from spinegrade.engine.cv import fold_seed_runs
from spinegrade.engine.run_folder import RunFolder
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_write_text
from spinegrade.metrics import (
    balanced_accuracy,
    clip_renormalise,
    confusion_matrix,
    sample_weights,
    weighted_mean,
)
from spinegrade.report.ablate import plot_version_curves

log = logging.getLogger(__name__)

# The comparison folder: runs/<label>/fold<k>/ (run folders) and the summary files.
RUNS_DIR = "runs"
TABLE_CSV = "table.csv"
TABLE_MD = "table.md"
CURVES_PNG = "curves.png"
MANIFEST_JSON = "runs.json"
# The version the paired differences are taken against (when it is among the configs).
REFERENCE = "v8"

# One change each to v8: (label, overrides, what the change undoes).
ONE_FACTOR_ABLATIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("sampler=weighted", ("train.sampler=weighted",), "WeightedRandomSampler instead of shuffle"),
    ("loss=unweighted_ce", ("loss.use_class_weights=false",), "plain CE, no [1,2,4] weights"),
    ("loss=focal", ("loss.focal_gamma=1.5",), "focal modulation gamma 1.5 on top"),
    ("aggregator=attention_mil", ("model.aggregator=attention_mil",), "attention-MIL pooling"),
    ("aggregator=bilstm_attention", ("model.aggregator=bilstm_attention",),
     "bi-LSTM + attention pooling"),
    ("level=none", ("model.level_conditioning=none",), "no level embedding"),
    ("level=film", ("model.level_conditioning=film",), "FiLM instead of concatenation"),
    ("mixup=0.4", ("train.mixup_alpha=0.4",), "mixup on"),
    ("bias=zero", ("model.bias_init=zero",), "head bias at zero, not the priors"),
    ("freeze=0", ("train.freeze_epochs=0",), "no frozen-backbone phase"),
    ("swa=off", ("train.swa=false",), "no SWA"),
)

TrainFn = Callable[[Config, Path, Path, int], object]


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the comparison."""

    label: str
    fold: int
    cfg: Config
    run_dir: Path
    change: str = ""
    seed: int = 0


def plan_runs(
    configs: Sequence[str | Path],
    folds: Sequence[int],
    out_dir: Path,
    *,
    preset: str | Path | None = None,
    overrides: Sequence[str] = (),
    one_factor: str | Path | None = None,
    seeds: int = 1,
) -> list[PlannedRun]:
    """Every (config, fold, seed) run to train, labelled by the config's ``name``.

    The seeds are ``train.seed .. train.seed + seeds - 1``; the folds come from
    ``data.split_seed``, so every version and seed sees the same validation studies.
    """
    variants: list[tuple[str, str | Path, tuple[str, ...], str]] = []
    for path in configs:
        variants.append(("", path, (), ""))
    if one_factor is not None:
        for label, extra, change in ONE_FACTOR_ABLATIONS:
            variants.append((label, one_factor, extra, change))
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for suffix, path, extra, change in variants:
        cfg = load_config(path, [*extra, *overrides], preset=preset)
        label = f"{cfg.name}:{suffix}" if suffix else cfg.name
        if label in seen:
            raise ValueError(f"two configs share the name '{label}'; give each a unique name")
        seen.add(label)
        folder = out_dir / RUNS_DIR / label.replace(":", "__").replace("=", "-")
        for fold, seed, cfg_run, name in fold_seed_runs(
                path, [*extra, *overrides], folds, range(cfg.train.seed, cfg.train.seed + seeds),
                preset):
            runs.append(PlannedRun(label, fold, cfg_run, folder / name, change, seed))
    return runs


def run_is_finished(run_dir: Path, epochs: int) -> bool:
    """True when the run wrote final.json (it may have stopped early), or its metrics.csv
    holds every epoch: training need not run again."""
    if RunFolder(run_dir).final.is_file():
        return True
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return False
    metrics = pd.read_csv(path)
    return len(metrics) > 0 and int(metrics["epoch"].max()) >= epochs


def cache_for(cfg: Config, cache: Path, data_dir: Path | None = None, workers: int = 1) -> Path:
    """The crop cache for ``cfg.data``'s pixel settings.

    ``cache`` is a cache folder, or a root holding caches named by their key (what
    ``spinegrade prepare --out ROOT`` makes). A missing one is prepared into the root from
    ``data_dir`` when given (resumable, reused next time).

    Raises:
        UserError: no cache with these settings and no data folder to prepare one from.
    """
    settings = dataclasses.asdict(cfg.data)
    if (cache / META_FILE).is_file():
        return cache
    if data_dir is not None:
        return prepare(data_dir, cache, settings, workers=workers)
    found = find_cache(cache, settings)
    if found is not None:
        return found
    try:
        return resolve_cache_dir(cache)
    except UserError:
        raise UserError(f"{cache} holds no {settings['condition']} crop cache for {cfg.name}'s "
                        "data settings; pass --data DATA to prepare it, or run 'spinegrade "
                        f"prepare DATA --out {cache} --config <{cfg.name}'s config>'") from None


def execute(runs: Sequence[PlannedRun], cache: Path | Callable[[Config], Path],
            train_fn: TrainFn) -> pd.DataFrame:
    """Train every planned run that is not finished yet; return what happened to each.

    ``cache`` is one cache for every run, or a function of the run's config (:func:`cache_for`).
    """
    rows = []
    for i, run in enumerate(runs, start=1):
        tag = f"[{i}/{len(runs)}] {run.label} fold {run.fold} seed {run.seed}"
        if run_is_finished(run.run_dir, run.cfg.train.epochs):
            print(f"{tag}: finished run found in {run.run_dir}, reused")
            rows.append(dict(label=run.label, fold=run.fold, seed=run.seed, status="reused",
                             seconds=0.0))
            continue
        print(f"{tag}: training -> {run.run_dir}", flush=True)
        start = time.perf_counter()
        train_fn(run.cfg, cache(run.cfg) if callable(cache) else cache, run.run_dir, run.fold)
        seconds = time.perf_counter() - start
        print(f"{tag}: done in {seconds:.0f} s", flush=True)
        rows.append(dict(label=run.label, fold=run.fold, seed=run.seed, status="trained",
                         seconds=seconds))
    return pd.DataFrame(rows)


def dead_class_epochs(metrics: pd.DataFrame) -> dict[str, list[int]]:
    """For each class, the epochs in which the model predicted it for no sample."""
    dead: dict[str, list[int]] = {}
    for name in CLASS_NAMES:
        col = f"pred_count_{name}"
        if col in metrics:
            epochs = metrics.loc[metrics[col] == 0, "epoch"].astype(int).tolist()
            if epochs:
                dead[name] = epochs
    return dead


def final_model_ba(run_dir: Path) -> tuple[float, str]:
    """Validation BA (no TTA) of the run's final model and its checkpoint name, from
    final.json (SWA's own metrics when it ran; NaN and '' when the run has no final.json)."""
    folder = RunFolder(run_dir)
    if not folder.final.is_file():
        return float("nan"), ""
    final = json.loads(folder.final.read_text())
    name = str(final.get("final_checkpoint", ""))
    if name == "swa" and isinstance(final.get("swa"), dict):
        return float(final["swa"]["balanced_accuracy"]), name
    metrics = pd.read_csv(folder.metrics)
    epoch = final.get("best_epoch") if name == "best" else int(metrics["epoch"].max())
    row = metrics.loc[metrics["epoch"] == epoch, "balanced_accuracy"]
    return (float(row.iloc[0]) if len(row) else float("nan")), name


def summarize_run(metrics: pd.DataFrame) -> dict:
    """Best-BA epoch, recall there, log loss there, and dead classes of one run."""
    best = int(metrics["balanced_accuracy"].astype(float).idxmax())
    row = metrics.loc[best]
    out = dict(
        best_ba=float(row["balanced_accuracy"]),
        best_epoch=int(row["epoch"]),
        weighted_logloss=float(row.get("weighted_logloss", np.nan)),
        dead=dead_class_epochs(metrics),
    )
    for name in CLASS_NAMES:
        out[f"recall_{name}"] = float(row.get(f"recall_{name}", np.nan))
    return out


def describe_architecture(cfg: Config) -> str:
    """Short architecture string for the table."""
    m = cfg.model
    if m.input_mode == "channels":
        core = f"{m.backbone} 2.5D {cfg.data.n_slices}-ch stem"
    else:
        core = f"{m.backbone} x{cfg.data.n_slices} + {m.aggregator}"
    level = {"embedding": f"+ level emb {m.level_embed_dim}", "film": "+ FiLM", "none": ""}
    return " ".join(p for p in (core, level[m.level_conditioning], f"-> {m.head}") if p)


def describe_loss(cfg: Config) -> str:
    """Short loss string for the table."""
    parts = [cfg.loss.name]
    if cfg.loss.use_class_weights:
        parts.append("w=" + "/".join(f"{w:g}" for w in cfg.loss.class_weights))
    if cfg.loss.focal_gamma > 0:
        parts.append(f"focal {cfg.loss.focal_gamma:g}")
    if cfg.train.sampler == "weighted":
        parts.append("+ weighted sampler")
    if cfg.train.mixup_alpha > 0:
        parts.append(f"+ mixup {cfg.train.mixup_alpha:g}")
    return " ".join(parts)


def _format_dead(per_fold: list[dict[str, list[int]]]) -> str:
    parts = []
    for fold_idx, dead in enumerate(per_fold):
        for name, epochs in dead.items():
            parts.append(f"{name} (fold {fold_idx}: ep {','.join(map(str, epochs))})")
    return "; ".join(parts) if parts else "no"


def _oof(run: PlannedRun) -> pd.DataFrame | None:
    path = RunFolder(run.run_dir).oof
    return pd.read_csv(path) if path.is_file() else None


def _ba(y: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray], float]:
    pred = probs.argmax(axis=1)
    return lambda w: balanced_accuracy(confusion_matrix(y, pred, weights=w))


def _wlogloss(y: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray], float]:
    nll = -np.log(clip_renormalise(probs)[np.arange(len(y)), y])
    base = sample_weights(y)
    return lambda w: weighted_mean(nll, base * w)


def paired_differences(group: Sequence[PlannedRun], reference: Sequence[PlannedRun]
                       ) -> dict[str, Interval] | None:
    """BA and weighted log loss of ``group`` minus ``reference`` on their shared samples.

    Runs pair up by (fold, seed); within a pair the samples are the validation rows both
    predicted (the same cache rows). All pairs are pooled, and one bootstrap resamples the
    studies of the pooled rows for both versions alike. None when no pair has oof.csv.
    """
    ref = {(r.fold, r.seed): r for r in reference}
    parts = []
    for run in group:
        other = ref.get((run.fold, run.seed))
        a, b = _oof(run), _oof(other) if other is not None else None
        if a is None or b is None:
            continue
        both = a.merge(b, on="row", suffixes=("", "_ref"))
        parts.append(both)
    if not parts:
        return None
    both = pd.concat(parts, ignore_index=True)
    y = both["label"].to_numpy(dtype=np.int64)
    pa = both[list(CLASS_PROB_COLUMNS)].to_numpy()
    pb = both[[f"{c}_ref" for c in CLASS_PROB_COLUMNS]].to_numpy()
    study = both["study_id"].to_numpy()
    return {"ba": paired_difference(_ba(y, pa), _ba(y, pb), study),
            "wlogloss": paired_difference(_wlogloss(y, pa), _wlogloss(y, pb), study)}


def _fmt_diff(iv: Interval) -> str:
    mark = " (≈ 0)" if iv.contains_zero else ""
    return f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]{mark}"


def reference_label(runs: Sequence[PlannedRun], reference: str | None = REFERENCE) -> str:
    """The label differences are taken against: ``reference`` if planned, else the first."""
    labels = list(dict.fromkeys(r.label for r in runs))
    return reference if reference in labels else labels[0]


def _final_bas(group: Sequence[PlannedRun], recorded: Sequence[float]) -> list[float]:
    """Each run's final-model BA: from its oof.csv, else ``recorded`` (final.json's value)."""
    out = []
    for run, ba in zip(group, recorded, strict=True):
        oof = _oof(run)
        if oof is not None:
            probs = oof[list(CLASS_PROB_COLUMNS)].to_numpy()
            out.append(_ba(oof["label"].to_numpy(dtype=np.int64), probs)(np.ones(len(oof))))
        elif not np.isnan(ba):
            out.append(ba)
    return out


def _ms(values: Sequence[float]) -> str:
    st = mean_std(values)
    return "n/a" if st["mean"] is None else f"{st['mean']:.3f} ± {st['std']:.3f}"


def build_table(runs: Sequence[PlannedRun], reference: str | None = REFERENCE) -> pd.DataFrame:
    """One row per version: mean +- std over folds x seeds, and paired differences to the reference."""
    ref_label = reference_label(runs, reference)
    ref_runs = [r for r in runs if r.label == ref_label]
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        summaries = [summarize_run(_read_metrics(r)) for r in group]
        bas = np.array([s["best_ba"] for s in summaries])
        finals = [final_model_ba(r.run_dir) for r in group]
        names = "/".join(sorted({name for _, name in finals if name}))
        row = {
            "Version": label,
            "Architecture": describe_architecture(group[0].cfg),
            "Loss": describe_loss(group[0].cfg),
            "Best BA": _ms(bas),
            "Final-model BA": (_ms(_final_bas(group, [ba for ba, _ in finals]))
                               + (f" ({names})" if names else "")),
            "Best epoch": ",".join(str(s["best_epoch"]) for s in summaries),
            "Dead class?": _format_dead([s["dead"] for s in summaries]),
        }
        for name in CLASS_NAMES:
            row[f"Recall {name}"] = round(float(np.mean([s[f"recall_{name}"] for s in summaries])), 3)
        row["Weighted log loss"] = round(float(np.mean([s["weighted_logloss"] for s in summaries])), 4)
        diffs = None if label == ref_label else paired_differences(group, ref_runs)
        for key, title in (("ba", "Δ final BA"), ("wlogloss", "Δ weighted log loss")):
            col = f"{title} vs {ref_label} [95% CI]"
            row[col] = "reference" if label == ref_label else (
                _fmt_diff(diffs[key]) if diffs else "n/a")
            row[f"_{key}_diff"] = json.dumps(diffs[key].to_dict()) if diffs else ""
        row["best_ba_mean"] = float(bas.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """Markdown table (without the numeric helper columns), and what the intervals mean."""
    cols = [c for c in table.columns if c != "best_ba_mean" and not c.startswith("_")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    lines += ["", "Best BA: the best epoch, picked on the fold it is reported on (optimistic). "
              "Final-model BA: the final model (SWA when it ran) from oof.csv. Mean ± std (ddof=1) "
              "over folds x seeds. Δ: paired difference to the reference on the validation "
              "samples both predicted, 95% percentile bootstrap over their studies; "
              "(≈ 0) marks an interval that contains zero, i.e. a difference these folds cannot "
              "tell from none."]
    return "\n".join(lines) + "\n"


def _read_metrics(run: PlannedRun) -> pd.DataFrame:
    return pd.read_csv(RunFolder(run.run_dir).metrics)


def write_outputs(runs: Sequence[PlannedRun], out_dir: Path, reference: str | None = REFERENCE
                  ) -> pd.DataFrame:
    """Write table.csv, table.md, curves.png and runs.json into ``out_dir``."""
    table = build_table(runs, reference)
    atomic_write_text(out_dir / TABLE_CSV, table.to_csv(index=False))
    atomic_write_text(out_dir / TABLE_MD, to_markdown(table))
    curves = {label: [_read_metrics(r) for r in runs if r.label == label]
              for label in dict.fromkeys(r.label for r in runs)}
    plot_version_curves(curves, out_dir / CURVES_PNG)
    manifest = [dict(label=r.label, fold=r.fold, seed=r.seed, run_dir=str(r.run_dir),
                     change=r.change) for r in runs]
    atomic_write_text(out_dir / MANIFEST_JSON, json.dumps(manifest, indent=2))
    return table
