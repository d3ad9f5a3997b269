"""Problems: a file or row that was skipped, or kept with a warning, and why. A leaf module.

Every long job (``prepare``, ``train-localizer``, ``predict``) and the DICOM reader record
what they could not use as :class:`Problem` values, built by the named constructors
:meth:`Problem.skipped` and :meth:`Problem.warning`; :func:`write_problems` writes them to
``problems.csv``, the one place their on-disk form is decided.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from spinegrade.io.atomic import atomic_path

# The report of what a job skipped, beside its outputs (cache, localizer run, submission).
PROBLEMS_FILE = "problems.csv"
# What problems.csv writes for an absent id or row (readers of older files rely on it).
_ABSENT = -1


class Severity(str, Enum):
    """What became of the thing concerned; the value is what ``problems.csv`` shows."""

    SKIPPED = "skipped"   # the sample, file or row is left out
    WARNING = "warning"   # kept, but worth a look

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One file or row that was skipped, or kept with a warning, and why.

    Build one with :meth:`skipped` or :meth:`warning`. Field order is the column order of
    ``problems.csv``.

    Attributes:
        study_id: the study concerned, None when unknown or not applicable.
        series_id: the series concerned, None when unknown or not applicable.
        file: the file or folder concerned (CSV, DICOM, series folder), relative to the data
            dir where possible; empty when the problem is not about one file.
        row: 1-based data row in ``file`` for CSV problems, None otherwise.
        kind: short machine-readable reason, e.g. ``empty_label``, ``missing_series``.
        severity: :class:`Severity` (a plain string is converted).
        message: one human-readable sentence.
    """

    study_id: int | None = None
    series_id: int | None = None
    file: str = ""
    row: int | None = None
    kind: str
    severity: Severity
    message: str

    def __post_init__(self) -> None:
        # Frozen: set through object.__setattr__. Accepts "skipped"/"warning" (JSON markers).
        object.__setattr__(self, "severity", Severity(self.severity))

    @classmethod
    def skipped(cls, *, kind: str, message: str, file: str = "", study_id: int | None = None,
                series_id: int | None = None, row: int | None = None) -> Problem:
        """A problem whose sample, file or row is left out."""
        return cls(study_id=study_id, series_id=series_id, file=file, row=row, kind=kind,
                   severity=Severity.SKIPPED, message=message)

    @classmethod
    def warning(cls, *, kind: str, message: str, file: str = "", study_id: int | None = None,
                series_id: int | None = None, row: int | None = None) -> Problem:
        """A problem about something that is kept."""
        return cls(study_id=study_id, series_id=series_id, file=file, row=row, kind=kind,
                   severity=Severity.WARNING, message=message)

    def to_record(self) -> dict[str, int | str]:
        """The ``problems.csv`` row: absent ids and row as -1, severity as its string."""
        return {
            "study_id": _ABSENT if self.study_id is None else self.study_id,
            "series_id": _ABSENT if self.series_id is None else self.series_id,
            "file": self.file,
            "row": _ABSENT if self.row is None else self.row,
            "kind": self.kind,
            "severity": self.severity.value,
            "message": self.message,
        }

    @classmethod
    def from_record(cls, record: dict) -> Problem:
        """The inverse of :meth:`to_record` (-1 ids and row become None)."""
        def opt(value: object) -> int | None:
            return None if int(value) == _ABSENT else int(value)  # type: ignore[call-overload]

        return cls(study_id=opt(record["study_id"]), series_id=opt(record["series_id"]),
                   file=str(record["file"]), row=opt(record["row"]), kind=str(record["kind"]),
                   severity=Severity(record["severity"]), message=str(record["message"]))

    def sort_key(self) -> tuple:
        """The order ``problems.csv`` lists problems in: study, series, file, row, kind, text."""
        r = self.to_record()
        return (r["study_id"], r["series_id"], r["file"], r["row"], r["kind"], r["message"])


PROBLEM_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Problem))


def write_problems(path: str | Path, problems: Iterable[Problem]) -> None:
    """Write ``problems.csv`` (header always present, rows in the given order) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROBLEM_COLUMNS)
        writer.writeheader()
        for p in problems:
            writer.writerow(p.to_record())


def read_problems(path: str | Path) -> list[Problem]:
    """Read a ``problems.csv`` written by :func:`write_problems`."""
    with open(path, newline="") as f:
        return [Problem.from_record(r) for r in csv.DictReader(f)]
