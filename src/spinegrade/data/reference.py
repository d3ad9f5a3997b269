"""The naive crop path, one request at a time: what ``prepare`` must equal and beat.

As public notebooks do, nothing is shared between requests. ``tests/test_prepare.py`` checks
that the cache holds exactly these crops; ``benchmarks/prepare.py`` times both paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spinegrade.data.prepare import cropper_for
from spinegrade.data.preprocess import CropRequest
from spinegrade.io.dicom import read_series
from spinegrade.io.dicom_file import decode_pixels, read_header


def crops_from_dicom(series_dir: str | Path, requests: Sequence[CropRequest],
                     settings: Mapping[str, Any]) -> list[np.ndarray]:
    """Per request, read only its slices' files and process whole slices.

    Each request reads the series' headers (for the spatial order), decodes its ``n_slices``
    files, windows and equalises each whole slice, then crops. Gives the same crops as
    :func:`~spinegrade.data.prepare.prepare` with the same ``settings``.

    Raises:
        KeyError, CoordinateOutOfImage: as :meth:`VolumeCropper.slice_plan`.
    """
    cropper = cropper_for(settings)
    out = []
    for req in requests:
        header_volume = read_series(series_dir, [req.instance_number], load_pixels=False)
        volume = dataclasses.replace(header_volume, slices=_LazySlices(header_volume.files))
        (result,) = cropper(volume, [req])
        if isinstance(result, Exception):
            raise result
        out.append(result)
    return out


class _LazySlices(Sequence):
    """Slices of a headers-only Volume, decoded from their file on first access."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, j):  # type: ignore[override]
        if j not in self._cache:
            header, ds, _ = read_header(self.files[j], with_pixels=True)
            self._cache[j] = decode_pixels(ds, header)
        return self._cache[j]
