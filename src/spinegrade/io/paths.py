"""Output paths checked before the work: can this folder or file be written?

Every command that writes (synth, prepare, gallery, train, evaluate, train-localizer,
predict, demo, ablate) calls :func:`check_output_dir` or :func:`check_output_file` on its
outputs first, so an unwritable ``--out`` fails in a second with a message naming the path
and the fix, instead of a traceback after an hour of work. The check really creates the
missing folders and a probe file (permission bits alone do not tell, e.g. for root or on
``/proc``), then removes what it created: a failed command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from spinegrade.errors import UserError

_PROBE_PREFIX = ".spinegrade-write-test-"


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Check that folder ``path`` can be created (if missing) and written into.

    Args:
        path: the output folder.
        option: how the user gave it (``--out``, ``OUT``), for the message.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UserError: naming the path, what is in the way and what to do.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder; give a folder path "
                        f"(or remove the file)")
    _probe(path, option, path)
    return path


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """Check that file ``path`` can be written (its folder created if missing).

    Raises:
        UserError: ``path`` is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name, e.g. "
                        f"{path / 'out'}{path.suffix or ''}")
    _probe(path.parent if str(path.parent) else Path("."), option, path)
    return path


def _probe(folder: Path, option: str, target: Path) -> None:
    """Create ``folder`` (and missing parents) and a probe file in it; undo both."""
    missing, existing = [], folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{option} {target}: {existing} is a file, not a folder; choose another "
                        f"{option} (or move {existing} away)")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {target}: cannot write there ({e.strerror or e}); choose a "
                        f"{option} in a folder you can write to") from None
    finally:
        for d in reversed(created):
            # Not empty any more (another process wrote there): leave it.
            with contextlib.suppress(OSError):
                d.rmdir()
