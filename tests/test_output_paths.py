"""Every writing command checks its outputs first: an unwritable --out is a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spinegrade.cli import main
from spinegrade.errors import UserError
from spinegrade.io.paths import check_output_dir, check_output_file


def _commands(data: Path, out: Path) -> dict[str, list[str]]:
    """argv of every command that writes, with ``out`` as its output."""
    return {
        "synth": ["synth", str(out), "--studies", "1", "--no-progress"],
        "prepare": ["prepare", str(data), "--out", str(out), "--no-progress"],
        "gallery": ["gallery", str(data), "--out", str(out / "crops.png")],
        "train": ["train", "--cache", str(data), "--out", str(out)],
        "evaluate": ["evaluate", str(data), "--out", str(out)],
        "train-localizer": ["train-localizer", "--data", str(data), "--out", str(out)],
        "predict": ["predict", "--localizer", str(data), str(data), "--out",
                    str(out / "submission.csv")],
        "demo": ["demo", "--out", str(out)],
        "ablate": ["ablate", "--cache", str(data), "--configs", "v8", "--out", str(out)],
    }


def _blocked_outputs(tmp_path: Path) -> dict[str, Path]:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    outs = {"parent is a file": blocker / "sub"}
    if os.path.isdir("/proc/self"):
        outs["/proc"] = Path("/proc/spinegrade-test/x")
    return outs


@pytest.mark.parametrize("command", list(_commands(Path("D"), Path("O"))))
def test_unwritable_out_is_an_error_before_any_work(tmp_path, capsys, command):
    """A parent that is a file, or /proc: exit 2, the path and the option named, no
    traceback, and nothing done (the inputs here are empty: the check comes first)."""
    data = tmp_path / "data"
    data.mkdir()
    for why, out in _blocked_outputs(tmp_path).items():
        code = main(_commands(data, out)[command])
        err = capsys.readouterr().err
        assert code == 2, (why, err)
        assert "Traceback" not in err and str(out) in err, (why, err)
        assert "--out" in err or "OUT" in err, err  # says which option to change
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "data"]
    assert not list(data.iterdir())  # nothing was written anywhere


def test_check_helpers(tmp_path):
    target = tmp_path / "new" / "deeper" / "run"
    assert check_output_dir(target) == target
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
    (tmp_path / "f.csv").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f.csv")
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_output_file(tmp_path)
    assert check_output_file(tmp_path / "x" / "sub.csv") == tmp_path / "x" / "sub.csv"
    assert not (tmp_path / "x").exists()
