"""Atomic writes keep the user's umask (mkstemp alone would make every file 0600)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from spinegrade.io.atomic import atomic_path, atomic_write_text


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_0666_minus_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    with atomic_path(tmp_path / "crops.npy", suffix=".npy") as tmp:
        np.save(tmp, np.zeros(3, dtype=np.uint8))
    for name in ("report.html", "crops.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    # The same as a plain open() in the same folder.
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode
