"""``spinegrade score`` through the CLI entry point, on small CSVs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spinegrade import competition
from spinegrade.cli import main
from spinegrade.constants import (
    CONDITIONS,
    LEVELS,
    SEVERITIES,
    SUBMISSION_COLUMNS,
    TRAIN_COLUMNS,
    row_id,
)

STUDIES = (101, 202, 303)


@pytest.fixture
def files(tmp_path):
    """train.csv, the matching solution.csv and a random submission.csv."""
    rng = np.random.default_rng(0)
    labels = rng.choice(np.asarray(SEVERITIES, dtype=object), (len(STUDIES), 25), p=[0.7, 0.2, 0.1])
    labels[1, 20] = None  # an empty cell: unscored
    train = pd.DataFrame(labels, columns=list(TRAIN_COLUMNS[1:]))
    train.insert(0, "study_id", STUDIES)
    paths = {name: tmp_path / f"{name}.csv" for name in ("train", "solution", "submission")}
    train.to_csv(paths["train"], index=False)
    competition.solution_from_train(train).to_csv(paths["solution"], index=False)
    sub = competition.uniform_submission(STUDIES)
    sub[list(SUBMISSION_COLUMNS[1:])] = rng.dirichlet([1, 1, 1], len(sub))
    sub.to_csv(paths["submission"], index=False)
    return paths


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["score", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_parts_then_score(files, capsys):
    code, out, _ = run(capsys, files["solution"], files["submission"])
    assert code == 0
    lines = out.strip().splitlines()
    expected = competition.competition_score(pd.read_csv(files["solution"]),
                                         pd.read_csv(files["submission"]))
    for line, part in zip(lines, competition.SCORE_PARTS, strict=False):
        assert line.startswith(part) and f"n={expected['n_scored'][part]}" in line
    assert lines[-1].startswith("score: ")
    assert float(lines[-1].split(": ")[1]) == pytest.approx(expected["score"], abs=1e-6)


def test_json_and_from_train_agree(files, capsys):
    code, out, _ = run(capsys, files["solution"], files["submission"], "--json")
    assert code == 0
    result = json.loads(out)
    assert set(competition.SCORE_PARTS) | {"score"} <= set(result)
    code, out, _ = run(capsys, "--from-train", files["train"], files["submission"], "--json")
    assert code == 0
    assert json.loads(out)["score"] == pytest.approx(result["score"], abs=1e-12)
    assert result["n_scored"]["subarticular"] == 2 * 5 * len(STUDIES) - 1


@pytest.mark.parametrize("problem", ["missing", "nan", "negative"])
def test_bad_submission_exits_2_naming_the_row(files, capsys, problem):
    sub = pd.read_csv(files["submission"])
    target = row_id(STUDIES[2], CONDITIONS[1], LEVELS[3])
    at = sub.index[sub[SUBMISSION_COLUMNS[0]] == target][0]
    if problem == "missing":
        sub = sub.drop(index=at)
    else:
        sub.loc[at, SUBMISSION_COLUMNS[2]] = np.nan if problem == "nan" else -0.5
    sub.to_csv(files["submission"], index=False)
    code, out, err = run(capsys, files["solution"], files["submission"])
    assert code == 2
    assert target in err and "Traceback" not in err
    assert "score:" not in out


def test_unreadable_inputs_exit_2(files, capsys, tmp_path):
    code, _, err = run(capsys, tmp_path / "nope.csv", files["submission"])
    assert code == 2 and "not found" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, _, err = run(capsys, files["solution"], empty)
    assert code == 2 and "cannot read" in err
    code, _, err = run(capsys, files["train"], files["submission"])  # a train.csv as solution
    assert code == 2 and "lacks column" in err


def test_solution_xor_from_train(files, capsys):
    code, _, err = run(capsys, files["submission"])
    assert code == 2 and "--from-train" in err
    code, _, err = run(capsys, files["solution"], files["submission"], "--from-train", files["train"])
    assert code == 2 and "exactly one" in err


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("SOLUTION.csv", "SUBMISSION.csv", "--from-train", "--json"):
        assert option in out


@pytest.mark.parametrize("values, same_as", [((0.0, 0.0, 0.0), (1 / 3, 1 / 3, 1 / 3)),
                                             # clipped to 1 first: (1, 0.5, 0.25) / 1.75
                                             ((2.0, 0.5, 0.25), (4 / 7, 2 / 7, 1 / 7))])
def test_unnormalised_rows_refused_unless_allowed(files, capsys, values, same_as):
    """An all-zero row or a value above 1 exits 2 naming the row; --allow-unnormalised
    scores it as the competition did (clipped, then renormalised). A foraminal row: the
    any-severe term reads spinal rows before renormalising."""
    sub = pd.read_csv(files["submission"])
    target = row_id(STUDIES[0], CONDITIONS[1], LEVELS[2])
    at = sub.index[sub[SUBMISSION_COLUMNS[0]] == target][0]
    sub.loc[at, list(SUBMISSION_COLUMNS[1:])] = values
    sub.to_csv(files["submission"], index=False)
    code, out, err = run(capsys, files["solution"], files["submission"])
    assert code == 2 and target in err and "--allow-unnormalised" in err
    assert "score:" not in out and "Traceback" not in err
    code, out, _ = run(capsys, files["solution"], files["submission"], "--allow-unnormalised",
                       "--json")
    assert code == 0
    sub.loc[at, list(SUBMISSION_COLUMNS[1:])] = same_as
    expected = competition.competition_score(pd.read_csv(files["solution"]), sub)
    assert json.loads(out)["score"] == pytest.approx(expected["score"], abs=1e-9)
