"""Stage 2 on new studies: localise every level, crop as in training, classify, write a submission.

For each study: read its series (from ``test_series_descriptions.csv`` + images, or from one
study folder whose series types come from the DICOM SeriesDescription), locate each
(condition, level) with the localizer, cut crops around it with *each classifier run's own*
preprocessing config (so runs trained at different crop sizes combine correctly), classify
with TTA, and average the runs of a condition in probability space (optionally weighted).
Conditions without a classifier, and levels that cannot be located, get prior
probabilities; a study whose series is missing or unreadable still gets all 25 rows, and
every such case is listed in ``problems.csv`` next to the submission. Reading and localising
the studies is :mod:`spinegrade.engine.studies`; its public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from spinegrade.config import Config, PredictConfig
from spinegrade.constants import (
    CLASS_NAMES,
    CONDITIONS,
    LEVELS,
    NUM_CLASSES,
    SEVERITIES,
    SUBMISSION_COLUMNS,
    row_id,
)
from spinegrade.data.cache import CropCache
from spinegrade.data.preprocess import CropRequest, build_cropper
from spinegrade.engine.calibrate import RunCalibration, load_calibration, prior_mix_of
from spinegrade.engine.localization_check import LocalizationCheck
from spinegrade.engine.localize import LocalizerRun
from spinegrade.engine.loop import resolve_device
from spinegrade.engine.priors import default_prior, prior_probs, rows_prior
from spinegrade.engine.run_folder import (
    CHECKPOINT_DIR,
    CHECKPOINT_NAMES,
    LOCALIZATION_FILE,
    LOCATIONS_FILE,
    STUDIES_FILE,
    RunFolder,
    figures_dir,
    read_checkpoint,
    side_file,
)
from spinegrade.engine.studies import (
    StudyInput,
    _int,
    check_locations,
    locate_levels,
    read_volumes,
    refused_levels,
    series_type,
    studies_from_dataset,
    study_from_folder,
)
from spinegrade.engine.tta import predict_views, tta_views
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path
from spinegrade.io.dicom import Volume
from spinegrade.models import build_model
from spinegrade.problems import PROBLEMS_FILE, Problem, write_problems
from spinegrade.report.predict import plot_study

_log = logging.getLogger(__name__)


# --- priors --------------------------------------------------------------------------------------


def training_prior(run_dir: Path, condition: str, fold: int | None, reweight: bool
                   ) -> np.ndarray | None:
    """(5, 3) per-level prior from a classifier run's training labels, or None if unknown.

    The labels come from the run's crop cache (``run.json``) restricted to the studies that
    ``split.csv`` puts outside the validation fold; the prior is :func:`priors.rows_prior
    <spinegrade.engine.priors.rows_prior>`, the one the run's calibration chose its prior
    mix against.
    """
    run = RunFolder(run_dir)
    try:
        info = json.loads(run.run_info.read_text())
        index = CropCache.open(info["cache"]).index
        split = pd.read_csv(run.split)
        fold = info.get("fold", fold) if fold is None else fold
        val = set(split.loc[split["fold"] == fold, "study_id"].astype(str))
        return rows_prior(index[~index["study_id"].astype(str).isin(val)], reweight)
    except Exception as e:  # any missing piece: the caller falls back to CLASS_BALANCE
        _log.info("%s: training labels not available for priors (%s)", run_dir, e)
        return None


# --- classifier runs -----------------------------------------------------------------------------


def parse_classifier_spec(spec: str) -> tuple[Path, float]:
    """``RUN`` or ``RUN:0.7`` -> (run folder, weight)."""
    m = re.fullmatch(r"(.+):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", spec)
    path, weight = (Path(m.group(1)), float(m.group(2))) if m else (Path(spec), 1.0)
    if not path.is_dir():
        raise UserError(f"--classifier {spec}: {path} is not a run folder")
    if weight <= 0:
        raise UserError(f"--classifier {spec}: the weight must be positive")
    return path, weight


@dataclass
class ClassifierRun:
    """One trained classifier run with its own preprocessing, ready to grade crops.

    Attributes:
        path: run folder.
        weight: weight in the average over the condition's runs.
        cfg: the run's resolved config (its ``data`` section defines the crops).
        condition: the condition it grades.
        model: the network, in eval mode.
        cropper: crops exactly as the run's cache was made.
        views: TTA views.
        prior: (5, 3) prior used where a level cannot be graded.
        calibration: the run's calibration.json (``predict.calibrate``), or None.
    """

    path: Path
    weight: float
    cfg: Config
    condition: str
    model: torch.nn.Module
    cropper: object
    views: list
    prior: np.ndarray
    device: torch.device
    checkpoint: str = "best"
    calibration: RunCalibration | None = None

    @classmethod
    def load(cls, path: Path, weight: float, pcfg: PredictConfig, device: torch.device
             ) -> ClassifierRun:
        """Load a run's checkpoint (``predict.checkpoint``, else the others) and config."""
        run = RunFolder(path)
        first = run.final_checkpoint() if pcfg.checkpoint == "final" else pcfg.checkpoint
        order = [first] + [n for n in CHECKPOINT_NAMES if n != first]
        ck_path = next((run.checkpoint(n) for n in order if run.checkpoint(n).is_file()), None)
        if ck_path is None:
            raise UserError(f"{path}: no {CHECKPOINT_DIR}/{{{','.join(CHECKPOINT_NAMES)}}}.pt; "
                            "is it a training run?")
        ck = read_checkpoint(ck_path, map_location=device)
        cfg = ck.cfg
        mcfg = dataclasses.replace(cfg.model, pretrained=False, pretrained_path="")
        model = build_model(mcfg, n_slices=cfg.data.n_slices, num_classes=NUM_CLASSES)
        model.load_state_dict(ck.model)
        model.to(device).eval()
        ecfg = cfg.eval
        views = (tta_views(ecfg.tta_brightness, ecfg.tta_scales) if pcfg.tta else tta_views())
        cond = cfg.data.condition
        prior = training_prior(path, cond, ck.fold, pcfg.prior_reweight)
        if prior is None:
            prior = default_prior(cond, pcfg.prior_reweight)
        return cls(path, weight, cfg, cond, model, build_cropper(cfg.data), views, prior, device,
                   ck_path.stem,
                   load_calibration(run, checkpoint=ck_path.stem) if pcfg.calibrate else None)

    @torch.no_grad()
    def grade(self, volume: Volume, requests: Sequence[tuple[int, CropRequest]],
              batch_size: int) -> dict[int, np.ndarray | Exception]:
        """Class probabilities per level for crops around ``(level, request)`` in ``volume``."""
        crops = self.cropper(volume, [r for _, r in requests])
        out: dict[int, np.ndarray | Exception] = {}
        ok = [(lv, c) for (lv, _), c in zip(requests, crops, strict=True)
              if not isinstance(c, Exception)]
        for (lv, _), c in zip(requests, crops, strict=True):
            if isinstance(c, Exception):
                out[lv] = c
        for start in range(0, len(ok), batch_size):
            chunk = ok[start:start + batch_size]
            x = torch.from_numpy(np.stack([c for _, c in chunk])).to(self.device).float() / 255.0
            level = torch.tensor([lv for lv, _ in chunk], dtype=torch.int64, device=self.device)
            probs, _ = predict_views(self.model, x, level, self.views)
            probs = probs.cpu().numpy().astype(np.float64)
            if self.calibration is not None:  # temperature and bias; the mix comes later
                probs = self.calibration.probs(probs, mix=False)
            for (lv, _), p in zip(chunk, probs, strict=True):
                out[lv] = p
        return out


def load_classifiers(specs: Sequence[str], pcfg: PredictConfig, device: torch.device
                     ) -> dict[str, list[ClassifierRun]]:
    """condition -> its classifier runs, from ``RUN[:weight]`` specs."""
    runs: dict[str, list[ClassifierRun]] = {}
    for spec in specs:
        path, weight = parse_classifier_spec(spec)
        run = ClassifierRun.load(path, weight, pcfg, device)
        runs.setdefault(run.condition, []).append(run)
        _log.info("classifier %s (%s, weight %g, %s.pt, crops %d px x %d slices)", path,
                  run.condition, weight, run.checkpoint, run.cfg.data.img_size,
                  run.cfg.data.n_slices)
    return runs


# --- one study -----------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """Predictions for one study.

    Attributes:
        study_id: the study.
        probs: (condition, level index) -> (3,) probabilities.
        source: (condition, level index) -> "model" or why the prior was used.
        located: the localizer's rows (series_id is the real series id).
        volumes: series id -> Volume read (kept for the figure).
        seconds: wall time.
    """

    study_id: str
    probs: dict[tuple[str, int], np.ndarray]
    source: dict[tuple[str, int], str]
    located: pd.DataFrame
    volumes: dict[str, Volume]
    seconds: float = 0.0


def _grade_condition(cond: str, runs: Sequence[ClassifierRun], located: pd.DataFrame,
                     volumes: dict[str, tuple[str, Volume]], pcfg: PredictConfig,
                     min_score: float) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Per level: the weighted mean of the runs' probabilities, or None with the reason."""
    refused = refused_levels(located, cond)
    here = located[(located["condition"] == cond) & (located["score"] >= min_score)]
    here = here[here["series_id"].isin(list(volumes))
                & ~here["level_idx"].astype(int).isin(list(refused))]
    requests: dict[str, list[tuple[int, CropRequest]]] = {}
    for r in here.itertuples():
        requests.setdefault(r.series_id, []).append(
            (int(r.level_idx), CropRequest(int(r.instance_number), float(r.x), float(r.y))))
    sums: dict[int, np.ndarray] = {}
    weights: dict[int, float] = {}
    errors: dict[int, str] = {}
    for sid, reqs in requests.items():
        vol = volumes[sid][1]
        for run in runs:
            for lv, p in run.grade(vol, reqs, pcfg.batch_size).items():
                if isinstance(p, Exception):
                    errors[lv] = f"crop failed ({p})"
                    continue
                sums[lv] = sums.get(lv, 0.0) + run.weight * p
                weights[lv] = weights.get(lv, 0.0) + run.weight
    probs = {lv: sums[lv] / weights[lv] for lv in sums}
    reasons = {}
    for lv in range(len(LEVELS)):
        if lv not in probs:
            reasons[lv] = (f"not located ({refused[lv]})" if lv in refused
                           else errors.get(lv, "not located"))
    return probs, reasons


def predict_study(st: StudyInput, localizer: LocalizerRun, classifiers: dict[str, list[ClassifierRun]],
                  pcfg: PredictConfig, problems: list[Problem]) -> StudyResult:
    """All 25 (condition, level) predictions of one study; never raises on bad input data."""
    start = time.perf_counter()
    volumes = read_volumes(st, problems, check_anatomy=pcfg.check_anatomy)
    located = locate_levels(localizer, st, volumes, problems)
    min_score = (pcfg.min_location_score if pcfg.min_location_score >= 0
                 else localizer.lcfg.min_score)
    if pcfg.check_anatomy:
        located = check_locations(located, volumes, min_score, problems, st.study_id)
    probs: dict[tuple[str, int], np.ndarray] = {}
    source: dict[tuple[str, int], str] = {}
    for cond in CONDITIONS:
        runs = classifiers.get(cond, [])
        if not runs:
            for lv in range(len(LEVELS)):
                probs[(cond, lv)] = default_prior(cond, pcfg.prior_reweight)[lv]
                source[(cond, lv)] = "prior: no classifier"
            continue
        total = sum(r.weight for r in runs)
        prior = sum(r.weight * r.prior for r in runs) / total
        got, reasons = _grade_condition(cond, runs, located, volumes, pcfg, min_score)
        mix = prior_mix_of(runs, pcfg.prior_mix)
        for lv in range(len(LEVELS)):
            if lv in got:
                mixed = (1.0 - mix) * got[lv] + mix * prior[lv]
                probs[(cond, lv)], source[(cond, lv)] = mixed, "model"
                continue
            probs[(cond, lv)], source[(cond, lv)] = prior[lv], f"prior: {reasons[lv]}"
            problems.append(Problem.warning(
                kind="prior_used", study_id=_int(st.study_id),
                message=f"{row_id(st.study_id, cond, LEVELS[lv])}: {reasons[lv]}; "
                        "prior probabilities used"))
    return StudyResult(st.study_id, probs, source, located,
                       {sid: v for sid, (_, v) in volumes.items()}, time.perf_counter() - start)


def submission_rows(result: StudyResult) -> list[dict]:
    """The study's 25 submission rows (probabilities renormalised to sum to 1)."""
    rows = []
    for cond in CONDITIONS:
        for lv, level in enumerate(LEVELS):
            p = np.clip(np.asarray(result.probs[(cond, lv)], dtype=np.float64), 0.0, None)
            p = p / p.sum() if p.sum() > 0 else np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
            rows.append({SUBMISSION_COLUMNS[0]: row_id(result.study_id, cond, level),
                         **dict(zip(SUBMISSION_COLUMNS[1:], p, strict=True))})
    return rows


NOT_GRADED = "not graded"


def grade_table(result: StudyResult) -> pd.DataFrame:
    """Per (level, condition): probabilities, predicted grade and where they came from.

    This is the table shown to a person: a row that came from the prior (not located, no
    classifier, refused anatomy) shows no probabilities and the grade "not graded", so a
    prior is never read as a diagnosis (the submission still carries its probabilities).
    """
    rows = []
    for lv, level in enumerate(LEVELS):
        for cond in CONDITIONS:
            src = result.source[(cond, lv)]
            if src == "model":
                p = result.probs[(cond, lv)] / np.sum(result.probs[(cond, lv)])
                cells = {**dict(zip(CLASS_NAMES, np.round(p, 3), strict=True)),
                         "grade": SEVERITIES[int(np.argmax(p))]}
            else:
                cells = {**dict.fromkeys(CLASS_NAMES, ""), "grade": NOT_GRADED}
            rows.append({"level": level, "condition": cond, **cells, "source": src})
    return pd.DataFrame(rows)


# --- the whole run -------------------------------------------------------------------------------


@dataclass
class PredictOutput:
    """What :func:`predict` wrote and returns."""

    submission: pd.DataFrame
    results: list[StudyResult]
    problems: list[Problem]
    files: dict[str, Path]


def predict(
    classifier_specs: Sequence[str],
    localizer_dir: str | Path,
    out_path: str | Path,
    pcfg: PredictConfig,
    *,
    data_dir: str | Path | None = None,
    study_dir: str | Path | None = None,
    split: str = "test",
    progress: bool = True,
) -> PredictOutput:
    """Predict every study of a dataset (or one study folder) and write the submission.

    Args:
        classifier_specs: ``RUN`` or ``RUN:weight`` per classifier run (any conditions;
            runs of the same condition are averaged).
        localizer_dir: a ``train-localizer`` run folder.
        out_path: submission CSV, written atomically. Beside it, named after it
            (:func:`side_file`): ``<stem>_problems.csv``, ``<stem>_locations.csv`` (every
            located level), ``<stem>_studies.csv`` (per-study timing) and,
            with ``predict.figures``, ``<stem>_figures/<study>.png``.
        pcfg: the ``predict`` config section.
        data_dir: dataset folder with ``{split}_series_descriptions.csv`` + ``{split}_images``.
        study_dir: instead, one study folder of DICOM series (no CSV).
        split: ``test`` or ``train`` (which CSV / images folder of ``data_dir``).
        progress: show a progress bar.
    """
    if (data_dir is None) == (study_dir is None):
        raise UserError("give either DATA_DIR or --study DIR")
    device = resolve_device(pcfg.device, "predict.device")
    studies, problems = _studies_to_predict(data_dir, study_dir, split)
    localizer = LocalizerRun.load(localizer_dir, pcfg.device, pcfg.localizer_shifts)
    classifiers = load_classifiers(classifier_specs, pcfg, device)
    for cond in CONDITIONS:
        if cond not in classifiers:
            _log.warning("no classifier for %s: its rows get the prior", cond)
    out = Path(out_path)
    fig_dir = figures_dir(out)
    results, rows = [], []
    check = LocalizationCheck.open(data_dir, split, problems)  # labelled split: judge it
    bar = tqdm(studies, desc="predict", unit="study", disable=not progress)
    for st in bar:
        res = predict_study(st, localizer, classifiers, pcfg, problems)
        rows += submission_rows(res)
        if pcfg.figures:
            _figure(res, fig_dir / f"{st.study_id}.png", problems)
        check.add(res.located, res.volumes)
        res.volumes = {}  # the pixels are not needed any more
        results.append(res)
        bar.set_postfix_str(f"{st.study_id}: {res.seconds:.1f} s")
        _log.debug("study %s: %.2f s", st.study_id, res.seconds)
    submission = pd.DataFrame(rows, columns=list(SUBMISSION_COLUMNS))
    files = _write_outputs(out, submission, results, problems)
    files.update(check.write(side_file(out, LOCALIZATION_FILE)))
    if pcfg.figures:
        files["figures"] = fig_dir
    return PredictOutput(submission, results, problems, files)


def _studies_to_predict(data_dir: str | Path | None, study_dir: str | Path | None, split: str
                        ) -> tuple[list[StudyInput], list[Problem]]:
    """The dataset's studies of ``split``, or the one ``--study`` folder (and its problems)."""
    if study_dir is None:
        return studies_from_dataset(Path(data_dir), split), []
    st, problems = _readable_study(Path(study_dir))
    return [st], problems


def _readable_study(study_dir: Path) -> tuple[StudyInput, list[Problem]]:
    """``--study``: the folder's series; a folder without one readable series is an error."""
    st, problems = study_from_folder(study_dir)
    if not st.series:
        reasons = "; ".join(f"{p.file}: {p.message}" for p in problems[:3]) or "no sub-folders"
        raise UserError(f"--study {study_dir}: no readable DICOM series ({reasons}); give "
                        "a study folder holding one folder of .dcm files per series")
    return st, problems


def _figure(res: StudyResult, path: Path, problems: list[Problem]) -> None:
    try:
        plot_study(res, path)
    except Exception as e:  # a figure must never cost a submission row
        problems.append(Problem.warning(kind="figure_failed", study_id=_int(res.study_id),
                                        file=str(path), message=f"{type(e).__name__}: {e}"))


def _write_outputs(out: Path, submission: pd.DataFrame, results: list[StudyResult],
                   problems: list[Problem]) -> dict[str, Path]:
    files = {"submission": out, "problems": side_file(out, PROBLEMS_FILE),
             "locations": side_file(out, LOCATIONS_FILE), "studies": side_file(out, STUDIES_FILE)}
    with atomic_path(out, suffix=".csv") as tmp:
        submission.to_csv(tmp, index=False, float_format="%.6f")
    write_problems(files["problems"], problems)
    located = [r.located for r in results if not r.located.empty]
    loc = pd.concat(located, ignore_index=True) if located else pd.DataFrame()
    with atomic_path(files["locations"], suffix=".csv") as tmp:
        loc.to_csv(tmp, index=False)
    timing = pd.DataFrame([{"study_id": r.study_id, "seconds": round(r.seconds, 3),
                            "graded": sum(s == "model" for s in r.source.values()),
                            "prior": sum(s != "model" for s in r.source.values())}
                           for r in results])
    with atomic_path(files["studies"], suffix=".csv") as tmp:
        timing.to_csv(tmp, index=False)
    return files


__all__ = ["NOT_GRADED", "ClassifierRun", "PredictOutput", "StudyInput", "StudyResult", "default_prior",
           "grade_table", "load_classifiers", "parse_classifier_spec", "predict", "predict_study",
           "prior_probs", "series_type", "studies_from_dataset", "study_from_folder",
           "submission_rows", "training_prior"]
