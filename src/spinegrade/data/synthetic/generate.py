"""``generate``: write a whole synthetic dataset in the RSNA 2024 Lumbar Spine layout."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spinegrade.constants import (
    CONDITIONS,
    COORD_COLUMNS,
    COORDINATES_CSV,
    NUM_CLASSES,
    SERIES_COLUMNS,
    TRAIN_CSV,
    images_dir_name,
    series_descriptions_csv,
)
from spinegrade.data.synthetic import labels as L
from spinegrade.data.synthetic.preview import save_preview
from spinegrade.data.synthetic.study import StudyResult, StudyTask, SynthOptions, make_study
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_write_text

TRAIN_IMAGES, TEST_IMAGES = images_dir_name("train"), images_dir_name("test")
CSV_FILES = (
    TRAIN_CSV, COORDINATES_CSV, series_descriptions_csv("train"),
    series_descriptions_csv("test"), "sample_submission.csv", "solution.csv",
)
MANIFEST = "synthetic.json"
PREVIEW = "preview.png"


@dataclass
class SynthSummary:
    """What ``generate`` wrote.

    Attributes:
        out_dir: the dataset folder.
        train_ids / test_ids: study ids of each split, in file order.
        n_series / n_images: series folders and DICOM files written (0 images if labels_only).
        n_coordinates: rows of train_label_coordinates.csv.
        n_empty: empty label cells over both splits.
        grade_counts: condition -> [Normal/Mild, Moderate, Severe] counts of non-empty
            cells over both splits.
        series: series_id -> {description, order (ascending | descending | shuffled:
            instance numbers vs position along the slice normal), contrast, stacks,
            n_slices, monochrome1}.
        files: name -> path of each CSV (and the manifest).
        seconds: wall time (not written to any file, to keep outputs reproducible).
    """

    out_dir: Path
    train_ids: list[int]
    test_ids: list[int]
    n_series: int = 0
    n_images: int = 0
    n_coordinates: int = 0
    n_empty: int = 0
    grade_counts: dict[str, list[int]] = field(default_factory=dict)
    series: dict[int, dict] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def _unique_ids(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    """``n`` distinct random integers in [low, high), in draw order."""
    seen: dict[int, None] = {}
    while len(seen) < n:
        for v in rng.integers(low, high, size=n - len(seen) + 4).tolist():
            if len(seen) < n:
                seen.setdefault(int(v), None)
    return list(seen)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; then clear only what we write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; choose an empty folder or pass --overwrite "
                            "(overwrite=True) to replace a previous synthetic dataset there")
        for name in (TRAIN_IMAGES, TEST_IMAGES):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (*CSV_FILES, MANIFEST, PREVIEW):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _check_args(n_studies: int, n_test: int, workers: int, difficulty: str = "easy") -> None:
    if difficulty not in L.DIFFICULTIES:
        raise UserError(f"difficulty '{difficulty}' is not one of {', '.join(L.DIFFICULTIES)}")
    if not isinstance(n_studies, int) or n_studies < 1:
        raise UserError(f"number of training studies must be at least 1, got {n_studies}")
    if n_test < 0:
        raise UserError(f"number of test studies must be 0 or more, got {n_test}")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")


def _run(tasks: list[StudyTask], workers: int, progress: bool) -> Iterator[StudyResult]:
    """Make every study, in order, serially or in worker processes."""
    bar = tqdm(total=len(tasks), desc="synth", unit="study", disable=not progress)
    if workers == 1:
        results: Iterable[StudyResult] = map(make_study, tasks)
        for r in results:
            bar.update()
            yield r
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(make_study, tasks, chunksize=1):
                bar.update()
                yield r
    bar.close()


def _write_tables(out: Path, train: list[StudyResult], test: list[StudyResult],
                  manifest: dict) -> dict[str, Path]:
    """Write the CSVs (each atomically) and the manifest, after all images exist."""
    texts = {
        series_descriptions_csv("train"):
            L.table_csv(SERIES_COLUMNS, [row for r in train for row in r.series_rows]),
        series_descriptions_csv("test"):
            L.table_csv(SERIES_COLUMNS, [row for r in test for row in r.series_rows]),
        COORDINATES_CSV:
            L.table_csv(COORD_COLUMNS, [row for r in train for row in r.coord_rows]),
        "sample_submission.csv": L.sample_submission_csv([r.study_id for r in test]),
        "solution.csv": L.solution_csv([(r.study_id, r.grades) for r in test]),
        MANIFEST: json.dumps(manifest, indent=1, sort_keys=True) + "\n",
        # train.csv last: its presence marks a complete dataset.
        TRAIN_CSV: L.train_csv([(r.study_id, r.grades) for r in train]),
    }
    files = {}
    for name, text in texts.items():
        atomic_write_text(out / name, text)
        files[name] = out / name
    return files


def _make_tasks(seed: int, n_train: int, n_test: int, out: Path,
                balance: dict[str, np.ndarray], options: SynthOptions) -> list[StudyTask]:
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    study_ids = _unique_ids(rng, n, 10_000_000, 4_294_967_295)
    series_ids = _unique_ids(rng, 3 * n, 100_000_000, 4_294_967_295)
    return [
        StudyTask(
            index=i, seed=seed, study_id=study_ids[i],
            series_ids=tuple(series_ids[3 * i: 3 * i + 3]),  # type: ignore[arg-type]
            images_dir=out / (TRAIN_IMAGES if i < n_train else TEST_IMAGES),
            balance=balance, options=options,
        )
        for i in range(n)
    ]


def _manifest(seed: int, n_train: int, n_test: int, options: SynthOptions,
              balance: dict[str, np.ndarray], series: dict[int, dict],
              results: Sequence[StudyResult] = ()) -> dict:
    """The content of synthetic.json: how the dataset was made, and each series' quirks."""
    level = L.DIFFICULTIES[options.difficulty]
    labelled = sum(int((r.grades != L.EMPTY).sum()) for r in results)
    return {
        "generator": "spinegrade.data.synthetic", "seed": seed, "n_train": n_train,
        "n_test": n_test, "options": asdict(options),
        "difficulty": {"grade_ranges": [list(r) for r in level.grade_ranges],
                       "label_noise": level.label_noise, "labelled_cells": labelled,
                       "relabelled_cells": sum(r.n_relabelled for r in results)},
        "class_balance": {c: balance[c].round(6).tolist() for c in CONDITIONS},
        "series": {str(k): v for k, v in series.items()},
    }


def _summarise(out: Path, train: list[StudyResult], test: list[StudyResult],
               series: dict[int, dict], files: dict[str, Path]) -> SynthSummary:
    """The SynthSummary of the written studies (all but the preview and the wall time)."""
    results = train + test
    summary = SynthSummary(out, [r.study_id for r in train], [r.study_id for r in test])
    summary.files = files
    summary.series = series
    summary.n_series = len(series)
    summary.n_images = sum(r.n_images for r in results)
    summary.n_coordinates = sum(len(r.coord_rows) for r in train)
    grades = np.stack([r.grades for r in results])
    summary.n_empty = int((grades == L.EMPTY).sum())
    summary.grade_counts = {
        c: [int((grades[:, i] == g).sum()) for g in range(NUM_CLASSES)]
        for i, c in enumerate(CONDITIONS)
    }
    return summary


def generate(
    out_dir: str | Path,
    n_studies: int,
    seed: int = 0,
    *,
    n_test: int | None = None,
    class_balance: Mapping[str, Sequence[float]] | None = None,
    progress: bool = True,
    workers: int = 1,
    overwrite: bool = False,
    preview: str | Path | None = None,
    options: SynthOptions | None = None,
) -> SynthSummary:
    """Write a synthetic dataset in the RSNA 2024 Lumbar Spine layout.

    Args:
        out_dir: output folder; must be empty or absent unless ``overwrite``.
        n_studies: number of training studies (train.csv, train_images/).
        seed: the same seed gives byte-identical files, whatever ``workers``.
        n_test: number of test studies (test_images/, solution.csv); default
            ``max(2, n_studies // 10)``.
        class_balance: condition -> three weights (Normal/Mild, Moderate, Severe), replacing
            the real-data default for that condition at every level.
        progress: show a tqdm progress bar.
        workers: processes generating studies in parallel.
        overwrite: replace a previous dataset in ``out_dir`` (only the files this writes).
        preview: if given, also write a preview figure of a few studies to this path.
        options: further knobs (matrix cap, labels only, quirk rates); see SynthOptions.

    Returns:
        A SynthSummary of what was written.

    Raises:
        UserError: bad sizes, a bad class balance, or a non-empty ``out_dir``.
    """
    start = time.perf_counter()
    n_test = max(2, n_studies // 10) if n_test is None else n_test
    options = options or SynthOptions()
    _check_args(n_studies, n_test, workers, options.difficulty)
    balance = L.resolve_balance(class_balance)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    tasks = _make_tasks(seed, n_studies, n_test, out, balance, options)
    results = list(_run(tasks, workers, progress))
    train, test = results[:n_studies], results[n_studies:]
    series = {sid: info for r in results for sid, info in r.series_info.items()}
    manifest = _manifest(seed, n_studies, n_test, options, balance, series, results)
    summary = _summarise(out, train, test, series, _write_tables(out, train, test, manifest))
    if preview is not None:
        summary.files["preview"] = save_preview(out, Path(preview))
    summary.seconds = time.perf_counter() - start
    return summary
