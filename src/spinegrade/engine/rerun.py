"""What ``train`` does with a run folder that already holds a run: resume, restart or refuse.

A folder holds a run when it has ``checkpoints/last.pt``, ``metrics.csv`` or ``final.json``
(a folder with only the files written at start, from a run that failed before its first
epoch, holds nothing to lose and is simply trained into). Then:

- unfinished (no ``final.json``), trained with the same config (up to :data:`RUNTIME_KEYS`)
  on the same cache (path and fingerprint): resumed, with or without ``--resume``;
- ``--restart``: every output the run folder names is removed before the new run writes
  its first file, so old and new files never mix;
- anything else: refused, with a message naming ``--resume`` / ``--restart`` / a new
  ``--out`` and what differs.

No torch here: the checkpoint is read through ``run_folder``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from spinegrade.config import Config, config_to_dict, save_config
from spinegrade.data.cache import CropCache
from spinegrade.engine import run_folder as rf
from spinegrade.engine.run_folder import RunFolder
from spinegrade.engine.split import save_split
from spinegrade.errors import UserError

log = logging.getLogger(__name__)

# Settings that change how a run is executed, not what it computes: they may differ on resume.
RUNTIME_KEYS: frozenset[str] = frozenset({"data.num_workers", "train.log_every"})


@dataclass(frozen=True)
class FolderState:
    """What a run folder holds, as far as rerunning is concerned."""

    has_run: bool
    finished: bool
    last_epoch: int | None
    config: dict[str, Any] | None


def run_state(run: RunFolder) -> FolderState:
    """Inspect ``run`` without changing it."""
    last = run.checkpoint("last")
    has_run = last.is_file() or run.metrics.is_file() or run.final.is_file()
    epoch, config = None, None
    if last.is_file():
        ck = rf.read_checkpoint(last)
        epoch, config = ck.epoch, ck.config
    elif run.config.is_file():
        config = yaml.safe_load(run.config.read_text())
    return FolderState(has_run, run.final.is_file(), epoch, config)


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``section.key: run has A, now B`` for every result-affecting value that differs."""
    now = config_to_dict(cfg)
    out = []
    for section, values in now.items():
        if not isinstance(values, dict):
            if saved.get(section) != values and section not in ("name", "description"):
                out.append(f"{section}: run has {saved.get(section)!r}, now {values!r}")
            continue
        old = saved.get(section) or {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RUNTIME_KEYS and old.get(key) != value:
                out.append(f"{name}: run has {old.get(key)!r}, now {value!r}")
    return out


def cache_difference(run: RunFolder, cache: Any) -> str | None:
    """Why ``cache`` is not the one the run was trained on, or None when it is."""
    info = run.read_info()
    path, fingerprint = info.get("cache"), info.get("cache_fingerprint")
    if path is None:
        return None
    if Path(path).resolve() != Path(cache.path).resolve():
        return f"the run was trained on the cache {path}, --cache now gives {cache.path}"
    now = cache.fingerprint if fingerprint is not None else None  # hashes index.csv
    if fingerprint is not None and fingerprint != now:
        return (f"the cache {cache.path} changed since the run was trained on it (fingerprint "
                f"{fingerprint} -> {now}: other samples or labels)")
    return None


def check_cache_unchanged(run: RunFolder, cache: Any) -> None:
    """Raise when the run's own cache changed under it (``evaluate``, ``train --resume``)."""
    info = run.read_info()
    if info.get("cache") is None or Path(info["cache"]).resolve() != Path(cache.path).resolve():
        return  # another cache on purpose (evaluate --cache): nothing to compare
    why = cache_difference(run, cache)
    if why:
        raise UserError(f"{run.root}: {why}. Its validation fold and metrics no longer "
                        "describe this cache: prepare the original data again into another "
                        "--out, or retrain (--restart) on the new cache.")


def open_run_cache(run: RunFolder, cache: str | Path | None = None) -> CropCache:
    """The crop cache ``cache``, else the run's own (``run.json``); the run's own is checked
    unchanged (:func:`check_cache_unchanged`).

    Raises:
        UserError: no cache given and ``run.json`` names none, or the run's cache changed.
    """
    path = cache or run.read_info().get("cache")
    if not path:
        raise UserError(f"{run.run_info} does not name the training cache; pass --cache")
    crops = CropCache.open(path)
    check_cache_unchanged(run, crops)
    return crops


def decide(run: RunFolder, cfg: Config, cache: Any, *, resume: bool, restart: bool) -> bool:
    """Whether to resume ``run``; raises ``UserError`` when training into it would lose work.

    Args:
        run: the ``--out`` folder.
        cfg: the config of this invocation.
        cache: the opened crop cache of this invocation.
        resume: ``--resume`` was given (insist on resuming).
        restart: ``--restart`` was given (replace the run; see :func:`clear_outputs`).
    """
    if resume and restart:
        raise UserError("--resume and --restart exclude each other: resume the run, or "
                        "replace it, not both")
    state = run_state(run)
    if restart or not state.has_run:
        return False
    where = f"{run.root} holds a"
    choices = ("Train into a new --out to keep it, or add --restart to replace all of its "
               "outputs")
    if state.finished:
        raise UserError(f"{where} finished run (final.json){_epoch(state)}; nothing to resume. "
                        f"{choices}.")
    problems = config_differences(state.config or {}, cfg) if state.config else []
    why_cache = cache_difference(run, cache)
    if why_cache:
        problems.append(why_cache)
    if problems:
        raise UserError(f"{where}n unfinished run{_epoch(state)} that this command would not "
                        "continue as it was trained:\n  " + "\n  ".join(problems)
                        + f"\nResume it as it was with --config {run.config} --resume (and its "
                        f"--cache), or: {choices}.")
    return True


def _epoch(state: FolderState) -> str:
    return "" if state.last_epoch is None else f" (last checkpoint: epoch {state.last_epoch})"


def start_outputs(run: RunFolder, cfg: Config, split: pd.DataFrame, restart: bool,
                  info: dict[str, Any]) -> None:
    """What a run writes once set up: with ``restart`` the old outputs go first, then
    config.yaml, run.json and split.csv (main process only)."""
    if restart:
        removed = clear_outputs(run)
        if removed:
            log.info("--restart: removed %s", ", ".join(p.name for p in removed))
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.root)
    rf.write_json(run.run_info, info)
    save_split(split, run.root)


def clear_outputs(run: RunFolder) -> list[Path]:
    """Remove every file and folder the run folder names (other files are left alone).

    Returns:
        What was removed.
    """
    names = [run.config, run.run_info, run.split, run.metrics, run.health, run.final,
             run.oof, run.calibration, run.report, run.tensorboard, run.plots, run.eval_dir,
             run.checkpoint("last").parent]
    removed = []
    for path in names:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
