"""Build small synthetic MR DICOM series with chosen, coherent geometry (for any test).

Stable helper API (other test modules rely on it):

- ``write_series(folder, ...) -> list[Path]``: one single-frame MR file per slice, named
  ``<instance_number>.dcm`` like the RSNA data, returned in *slice order* k = 0..n-1.
- ``write_broken_file(path, kind, source=None) -> Path``: an empty / text / truncated /
  pixel-less file for error-path tests.
- ``gdcm_transcode(path, uid)``: re-encode a file in place (e.g. to JPEG lossless).
- ``ORIENTATIONS``: the ImageOrientationPatient and position step of each orientation.

Geometry (DICOM LPS patient coordinates, mm). Slice k of n sits at
``IPP_k = origin + (k - (n - 1) / 2) * spacing * step``; so with the defaults
(n=5, spacing=10, origin=0) a sagittal series has IPP x = -20, -10, 0, 10, 20. The slice normal
is ``row x column`` of the IOP:

======  =====================  ===========  ===========
name    IOP (row, column)      step         normal
======  =====================  ===========  ===========
sag     (0,1,0), (0,0,-1)      (1,0,0)      (-1,0,0)
ax      (1,0,0), (0,1,0)       (0,0,1)      (0,0,1)
cor     (1,0,0), (0,0,-1)      (0,1,0)      (0,1,0)
======  =====================  ===========  ===========

so a reader that sorts ascending along the normal returns a sagittal series in *decreasing*
x (k = n-1 first) and axial/coronal series in increasing k.

Pixels: stored values are ``pixel_fn(k, shape)`` (default ``default_pixels``:
``100 * (k + 1) + (row + column) % 50``), unsigned, BitsAllocated 16, BitsStored 12, so a
slice is recognisable from its corner value ``100 * (k + 1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

ORIENTATIONS: dict[str, dict[str, tuple[float, ...]]] = {
    "sag": {"iop": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "step": (1.0, 0.0, 0.0)},
    "ax": {"iop": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "step": (0.0, 0.0, 1.0)},
    "cor": {"iop": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0), "step": (0.0, 1.0, 0.0)},
}
# Short names accepted by ``transfer_syntax``; any transfer syntax UID string works too.
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
    "jpeg_lossless": JPEGLosslessSV1,
}

PixelFn = Callable[[int, tuple[int, int]], np.ndarray]


def default_pixels(k: int, shape: tuple[int, int]) -> np.ndarray:
    """Stored values of slice k: ``100 * (k + 1) + (row + column) % 50`` (uint16)."""
    r, c = np.indices(shape)
    return (100 * (k + 1) + (r + c) % 50).astype(np.uint16)


def instance_order(n: int, order: str, start: int = 1, seed: int = 0) -> list[int]:
    """Instance number of each slice k: 'sorted' (start + k), 'reversed' or 'shuffled'.

    'shuffled' is a seeded permutation that is neither ascending nor descending (n >= 3).
    """
    if order == "sorted":
        return [start + k for k in range(n)]
    if order == "reversed":
        return [start + n - 1 - k for k in range(n)]
    if order != "shuffled":
        raise ValueError(f"order must be sorted, reversed or shuffled, not {order!r}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        diffs = np.diff(perm)
        if n < 3 or not (np.all(diffs > 0) or np.all(diffs < 0)):
            return [start + int(p) for p in perm]


def write_series(
    folder: str | Path,
    *,
    orientation: str = "sag",
    n: int = 5,
    shape: tuple[int, int] = (32, 32),
    spacing: float = 10.0,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    order: str = "sorted",
    instance_numbers: Sequence[int] | None = None,
    start_instance: int = 1,
    seed: int = 0,
    monochrome1: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[object, object] | None = None,
    pixel_fn: PixelFn | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    positions: Sequence[Sequence[float]] | None = None,
    iop: Sequence[float] | None = None,
    transfer_syntax: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "Sagittal T2/STIR",
    drop_tags: Sequence[str] = (),
    bits_stored: int = 12,
) -> list[Path]:
    """Write an MR series into ``folder``; return the files in slice order k = 0..n-1.

    Args:
        folder: created if missing; several calls with the same ``series_uid`` and disjoint
            instance numbers build one series holding several stacks.
        orientation: 'sag', 'ax' or 'cor' (see the module docstring for the geometry).
        n: number of slices.
        shape: (rows, columns) of every slice, unless ``shapes`` gives one per slice.
        spacing: distance between neighbouring slices along ``step``, mm.
        pixel_spacing: PixelSpacing (row, column), mm.
        origin: IPP of the middle of the stack.
        order: how InstanceNumber runs over k: 'sorted', 'reversed' or 'shuffled'.
        instance_numbers: explicit InstanceNumber per slice (overrides ``order``).
        start_instance: first instance number for ``order``.
        seed: seed of the 'shuffled' permutation.
        monochrome1: write PhotometricInterpretation MONOCHROME1 (same stored values).
        slope, intercept: RescaleSlope / RescaleIntercept (written only if not 1 / 0).
        window: (WindowCenter, WindowWidth); each a number or a list (multi-valued tag).
        pixel_fn: stored values of slice k, ``pixel_fn(k, shape) -> uint16 array``.
        shapes: per-slice (rows, columns), for series whose slices differ in size.
        positions: explicit IPP per slice (overrides the computed ones), e.g. duplicates.
        iop: explicit ImageOrientationPatient (the position step stays that of
            ``orientation``).
        transfer_syntax: None/'explicit', 'rle', 'jpegls', 'j2k', 'jpeg_lossless' or a UID.
        series_uid, study_uid: generated if None.
        description: SeriesDescription.
        drop_tags: keywords to leave out, e.g. ('ImagePositionPatient', 'WindowCenter').
        bits_stored: BitsStored (BitsAllocated is 16); sets the MONOCHROME1 inversion range.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    geo = ORIENTATIONS[orientation]
    step = np.array(geo["step"])
    if instance_numbers is None:
        instance_numbers = instance_order(n, order, start_instance, seed)
    if positions is None:
        positions = [np.asarray(origin, float) + (k - (n - 1) / 2) * spacing * step
                     for k in range(n)]
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    paths = []
    for k in range(n):
        slice_shape = tuple(shapes[k]) if shapes is not None else tuple(shape)
        pixels = (pixel_fn or default_pixels)(k, slice_shape).astype(np.uint16)
        ds = _slice_dataset(
            pixels, instance=int(instance_numbers[k]), position=positions[k],
            iop=iop if iop is not None else geo["iop"], pixel_spacing=pixel_spacing,
            spacing=spacing, monochrome1=monochrome1, slope=slope, intercept=intercept,
            window=window, series_uid=series_uid, study_uid=study_uid,
            description=description, bits_stored=bits_stored,
        )
        for keyword in drop_tags:
            if keyword in ds:
                delattr(ds, keyword)
        path = folder / f"{instance_numbers[k]}.dcm"
        if path.exists():  # duplicate instance numbers: keep both files
            path = folder / f"{instance_numbers[k]}_{k}.dcm"
        _save(ds, pixels, path, transfer_syntax)
        paths.append(path)
    return paths


def _slice_dataset(pixels: np.ndarray, *, instance: int, position: Sequence[float],
                   iop: Sequence[float], pixel_spacing: tuple[float, float], spacing: float,
                   monochrome1: bool, slope: float, intercept: float,
                   window: tuple[object, object] | None, series_uid: str, study_uid: str,
                   description: str, bits_stored: int) -> Dataset:
    """One uncompressed single-frame MR dataset with file meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid
    ds.Modality = "MR"
    ds.PatientID = "synthetic"
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = float(spacing)
    ds.SpacingBetweenSlices = float(spacing)
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _save(ds: Dataset, pixels: np.ndarray, path: Path, transfer_syntax: str | None) -> None:
    """Write ``ds``, compressed to ``transfer_syntax`` with the installed encoders."""
    uid = TRANSFER_SYNTAXES.get(transfer_syntax or "explicit", transfer_syntax)
    if uid == JPEGLosslessSV1:
        # pydicom has no JPEG lossless encoder; GDCM transcodes the written file.
        ds.save_as(path, enforce_file_format=True)
        gdcm_transcode(path, uid)
        return
    if uid != ExplicitVRLittleEndian:
        ds.compress(uid, pixels)
    ds.save_as(path, enforce_file_format=True)


def gdcm_transcode(path: str | Path, uid: str) -> None:
    """Re-encode a DICOM file in place to transfer syntax ``uid`` with GDCM."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise RuntimeError(f"gdcm cannot read {path}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(uid)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm cannot transcode {path} to {uid}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm cannot write {path}")


def write_broken_file(path: str | Path, kind: str, source: str | Path | None = None) -> Path:
    """Write a deliberately unusable file.

    Args:
        path: where to write it.
        kind: 'empty' (0 bytes), 'text' (not DICOM), 'truncated' (the first half of
            ``source``), 'header_only' (``source`` without its PixelData).
        source: a valid DICOM file, for 'truncated' and 'header_only'.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("study_id,series_id\n1,2\n")
    elif kind == "truncated":
        data = Path(source).read_bytes()  # type: ignore[arg-type]
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_only":
        ds = pydicom.dcmread(source)  # type: ignore[arg-type]
        del ds.PixelData
        ds.save_as(path, enforce_file_format=True)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return path
