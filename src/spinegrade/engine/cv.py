"""``spinegrade cv``: every condition x fold (x seed) of one config, then honest numbers.

A CV folder holds::

    CV/cache/<condition>-<hash>/        crop caches (reused when complete; or --cache-root)
    CV/runs/<condition>/fold<k>/        one training run folder per unit
                                        (fold<k>-seed<s> with --seeds > 1)
    CV/logs/<condition>-fold<k>....log  output of units run as subprocesses (several GPUs)
    CV/plan.json                        what was asked (config, conditions, folds, seeds)
    CV/oof.csv, cv.json, cv.md, ensemble.yaml, report.html   (see engine/cv_results.py)

A unit is one training run (condition, fold, seed). Units whose run folder has final.json
and oof.csv with the same resolved config are reused; a killed one resumes from its
last.pt (``fit(resume=True)`` is exact). With several visible GPUs the units run in
parallel, one subprocess per GPU; ``--only`` runs selected units (e.g. one per job of a
cluster array) and ``--collect`` writes the results once every unit is finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spinegrade.config import Config, config_to_dict, load_config, save_config
from spinegrade.constants import CONDITIONS
from spinegrade.engine import run_folder as rf
from spinegrade.engine.ensemble import ENSEMBLE_FILE
from spinegrade.engine.rerun import config_differences
from spinegrade.engine.run_folder import RunFolder
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_write_text

RUNS_DIR = "runs"
CACHE_DIR = "cache"
LOGS_DIR = "logs"
PLAN_FILE = "plan.json"
OOF_FILE = rf.OOF_FILE  # a run's name for its out-of-fold file; here in the submission format
CV_JSON = "cv.json"
CV_MD = "cv.md"
REPORT_FILE = rf.REPORT_FILE
ALL = "all"
# Seconds between checks of the running subprocesses (several GPUs).
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class CvFolder:
    """A cross-validation folder and the path of each thing in it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def runs(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def cache(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def plan(self) -> Path:
        return self.root / PLAN_FILE

    @property
    def oof(self) -> Path:
        return self.root / OOF_FILE

    @property
    def cv_json(self) -> Path:
        return self.root / CV_JSON

    @property
    def cv_md(self) -> Path:
        return self.root / CV_MD

    @property
    def ensemble(self) -> Path:
        return self.root / ENSEMBLE_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE


@dataclass(frozen=True)
class Unit:
    """One training run of the cross-validation."""

    condition: str
    fold: int
    seed: int
    cfg: Config
    run_dir: Path

    @property
    def tag(self) -> str:
        """``condition:fold:seed``, what ``--only`` accepts."""
        return f"{self.condition}:{self.fold}:{self.seed}"


def resolve_conditions(names: Sequence[str]) -> list[str]:
    """``all`` -> every condition; otherwise the names, checked and de-duplicated."""
    if not names or list(names) == [ALL]:
        return list(CONDITIONS)
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise UserError(f"--conditions: unknown {', '.join(unknown)}; choose '{ALL}' or any of "
                        f"{', '.join(CONDITIONS)}")
    return list(dict.fromkeys(names))


def plan_units(config: str | Path, conditions: Sequence[str], out: Path, *,
               folds: int | None = None, seeds: int = 1, preset: str | Path | None = None,
               overrides: Sequence[str] = ()) -> list[Unit]:
    """Every (condition, fold, seed) unit, its resolved config and run folder.

    The seeds are ``train.seed, train.seed + 1, ...``; the fold split is ``data.split_seed``'s
    for all of them, so seeds of one fold train on the same studies.
    """
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    base = load_config(config, overrides, preset=preset)
    n_folds = base.data.folds if folds is None else folds
    if n_folds < 2:
        raise UserError(f"--folds must be at least 2, got {n_folds}")
    units = []
    for cond in resolve_conditions(conditions):
        for fold, seed, cfg, name in fold_seed_runs(
                config, [*overrides, f"data.condition={cond}", f"data.folds={n_folds}"],
                range(n_folds), range(base.train.seed, base.train.seed + seeds), preset):
            units.append(Unit(cond, fold, seed, cfg, CvFolder(out).runs / cond / name))
    return units


def fold_seed_runs(config: str | Path, overrides: Sequence[str], folds: Iterable[int],
                   seeds: range, preset: str | Path | None = None
                   ) -> list[tuple[int, int, Config, str]]:
    """``(fold, seed, resolved config, run folder name)`` of every fold x seed of one config.

    The name is ``fold<k>``, or ``fold<k>-seed<s>`` when there are several seeds; the
    resolved config is ``config`` with ``overrides``, ``data.fold`` and ``train.seed``. Both
    ``cv`` and ``ablate`` plan their runs with it.
    """
    runs = []
    for fold in folds:
        for seed in seeds:
            cfg = load_config(config, [*overrides, f"data.fold={fold}", f"train.seed={seed}"],
                              preset=preset)
            name = f"fold{fold}" if len(seeds) == 1 else f"fold{fold}-seed{seed}"
            runs.append((fold, seed, cfg, name))
    return runs


def select_units(units: Sequence[Unit], only: Sequence[str]) -> list[Unit]:
    """The units ``--only condition:fold[:seed]`` names (every seed of a fold without one)."""
    chosen: list[Unit] = []
    for spec in only:
        parts = spec.split(":")
        try:
            cond, fold = parts[0], int(parts[1])
            seed = int(parts[2]) if len(parts) == 3 else None
            if len(parts) > 3:
                raise ValueError
        except (IndexError, ValueError):
            raise UserError(f"--only {spec}: expected CONDITION:FOLD or CONDITION:FOLD:SEED") from None
        hit = [u for u in units if u.condition == cond and u.fold == fold
               and (seed is None or u.seed == seed)]
        if not hit:
            raise UserError(f"--only {spec}: no such unit; the plan has "
                            f"{', '.join(u.tag for u in units[:6])}{' ...' if len(units) > 6 else ''}")
        chosen += [u for u in hit if u not in chosen]
    return chosen


def unit_state(unit: Unit) -> str:
    """``finished`` (final.json and oof.csv), ``partial`` (a last.pt to resume) or ``new``.

    Raises:
        UserError: the run folder holds a run of another config.
    """
    run = RunFolder(unit.run_dir)
    if run.config.is_file():
        diff = config_differences(config_to_dict(load_config(run.config)), unit.cfg)
        if diff:
            raise UserError(f"{unit.run_dir} holds a run with other settings ({', '.join(diff[:5])}); "
                            "use another --out, or delete that folder to train it again")
    if run.final.is_file() and run.oof.is_file():
        return "finished"
    return "partial" if run.checkpoint("last").is_file() else "new"


def prepare_caches(units: Sequence[Unit], data_dir: Path, cache_root: Path, workers: int = 1
                   ) -> dict[str, Path]:
    """Each condition's crop cache (built, finished or reused by ``data.prepare``)."""
    from spinegrade.data.prepare import prepare

    caches: dict[str, Path] = {}
    for unit in units:
        if unit.condition not in caches:
            settings = dataclasses.asdict(unit.cfg.data)
            caches[unit.condition] = prepare(data_dir, cache_root, settings, workers=workers)
    return caches


TrainFn = Callable[[Unit, Path], object]


def _fit_unit(unit: Unit, cache: Path) -> object:
    from spinegrade.engine.train import fit

    return fit(unit.cfg, cache, unit.run_dir, resume=True)


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_units(units: Sequence[Unit], caches: dict[str, Path], *, train_fn: TrainFn = _fit_unit,
                gpus: int | None = None, logs: Path | None = None) -> list[dict]:
    """Train every unit that is not finished; one subprocess per GPU when there are several.

    Returns:
        One ``{tag, status, seconds}`` per unit: ``reused``, ``resumed`` or ``trained``.
    """
    rows, pending = [], []
    for i, unit in enumerate(units, start=1):
        state = unit_state(unit)
        if state == "finished":
            print(f"[{i}/{len(units)}] {unit.tag}: finished run in {unit.run_dir}, reused", flush=True)
            rows.append({"tag": unit.tag, "status": "reused", "seconds": 0.0})
        else:
            pending.append((unit, "resumed" if state == "partial" else "trained"))
    gpus = visible_gpus() if gpus is None else gpus
    if gpus > 1 and len(pending) > 1:
        return rows + _train_parallel(pending, caches, gpus, logs or units[0].run_dir.parent)
    for unit, status in pending:
        print(f"{unit.tag}: {'resuming' if status == 'resumed' else 'training'} -> {unit.run_dir}",
              flush=True)
        start = time.perf_counter()
        train_fn(unit, caches[unit.condition])
        rows.append({"tag": unit.tag, "status": status, "seconds": time.perf_counter() - start})
        print(f"{unit.tag}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    return rows


def unit_command(unit: Unit, cache: Path) -> list[str]:
    """The ``spinegrade train`` command of one unit (its resolved config saved beforehand)."""
    return [sys.executable, "-m", "spinegrade.cli", "train", "--config",
            str(RunFolder(unit.run_dir).config), "--cache", str(cache), "--out",
            str(unit.run_dir), "--resume"]


def _train_parallel(pending: list[tuple[Unit, str]], caches: dict[str, Path], gpus: int,
                    logs: Path) -> list[dict]:
    """Run the units as subprocesses, at most one per GPU (CUDA_VISIBLE_DEVICES) at a time."""
    logs.mkdir(parents=True, exist_ok=True)
    queue, running, rows, failed = list(pending), {}, [], []
    while queue or running:
        free = [g for g in range(gpus) if g not in running]
        while queue and free:
            unit, status = queue.pop(0)
            gpu = free.pop(0)
            unit.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(unit.cfg, unit.run_dir)
            log_path = logs / f"{unit.tag.replace(':', '-')}.log"
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            with open(log_path, "a") as fh:
                proc = subprocess.Popen(unit_command(unit, caches[unit.condition]), env=env,
                                        stdout=fh, stderr=subprocess.STDOUT)
            running[gpu] = (proc, unit, status, time.perf_counter(), log_path)
            print(f"{unit.tag}: {status} on GPU {gpu} -> {unit.run_dir} (log {log_path})", flush=True)
        time.sleep(POLL_SECONDS)
        for gpu, (proc, unit, status, start, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[gpu]
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                failed.append(f"{unit.tag} (exit {proc.returncode}, see {log_path})")
            print(f"{unit.tag}: exit {proc.returncode} after {seconds:.0f} s", flush=True)
            rows.append({"tag": unit.tag, "status": status, "seconds": seconds})
    if failed:
        raise UserError("units failed: " + "; ".join(failed) + "; run the same command again "
                        "to resume them")
    return rows


def write_plan(folder: CvFolder, *, data_dir: Path, config: str, preset: str | None,
               overrides: Sequence[str], units: Sequence[Unit], localizer: str | None) -> None:
    """``plan.json``: what this CV folder was asked to hold."""
    folder.root.mkdir(parents=True, exist_ok=True)
    plan = {"data": str(Path(data_dir).resolve()), "config": str(config), "preset": preset,
            "overrides": list(overrides), "localizer": localizer,
            "conditions": list(dict.fromkeys(u.condition for u in units)),
            "folds": units[0].cfg.data.folds if units else None,
            "seeds": sorted({u.seed for u in units}), "units": [u.tag for u in units]}
    atomic_write_text(folder.plan, json.dumps(plan, indent=2) + "\n")


def unfinished(units: Sequence[Unit]) -> list[Unit]:
    """The units whose run is not finished yet."""
    return [u for u in units if unit_state(u) != "finished"]


__all__ = ["CvFolder", "Unit", "fold_seed_runs", "plan_units", "prepare_caches", "resolve_conditions",
           "select_units", "train_units", "unfinished", "unit_state", "write_plan"]
