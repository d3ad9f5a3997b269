"""Read one DICOM file: its header as a :class:`SliceHeader`, its pixels as float32 values.

numpy + pydicom only. Per slice the pixels go through RescaleSlope/Intercept and MONOCHROME1
inversion (:class:`PixelMapping`); compressed transfer syntaxes (JPEG 2000, JPEG-LS, RLE,
JPEG lossless) are decoded through pydicom's plugins (pylibjpeg-openjpeg, pyjpegls,
pylibjpeg-rle, python-gdcm). A file that cannot give a slice raises
:class:`UnusableFileError` with the reason; ``io.dicom`` turns that into a Problem.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from spinegrade.io import geometry


@dataclass(frozen=True)
class PixelMapping:
    """Stored value -> returned value: RescaleSlope/Intercept, then MONOCHROME1 inverted.

    MONOCHROME1 (low = bright) is mirrored within the range BitsStored allows,
    ``v' = low + high - v`` with (low, high) the rescaled stored range, not within a slice's
    own min/max, so every slice of a stack gets the same mapping. For 12-bit unsigned data
    without rescale that is ``v' = 4095 - v``.
    """

    slope: float = 1.0
    intercept: float = 0.0
    monochrome1: bool = False
    bits_stored: int = 16
    signed: bool = False

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelMapping:
        """The mapping a file's header asks for (absent rescale tags: identity)."""
        return cls(
            slope=_float(ds.get("RescaleSlope"), 1.0),
            intercept=_float(ds.get("RescaleIntercept"), 0.0),
            monochrome1=str(ds.get("PhotometricInterpretation", "")).strip().upper()
            == "MONOCHROME1",
            bits_stored=int(_float(ds.get("BitsStored"), _float(ds.get("BitsAllocated"), 16.0))),
            signed=int(_float(ds.get("PixelRepresentation"), 0.0)) == 1,
        )

    def value_range(self) -> tuple[float, float]:
        """(low, high) of the values a pixel can take after rescaling."""
        bits = self.bits_stored
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if self.signed else (0, 2**bits - 1)
        a, b = lo * self.slope + self.intercept, hi * self.slope + self.intercept
        return min(a, b), max(a, b)

    def __call__(self, stored: np.ndarray) -> np.ndarray:
        """Map stored values (any shape) to float32 returned values."""
        out = stored.astype(np.float32)
        if self.slope != 1.0 or self.intercept != 0.0:
            out = out * np.float32(self.slope) + np.float32(self.intercept)
        if self.monochrome1:
            lo, hi = self.value_range()
            out = np.float32(lo + hi) - out
        return out

    def window(self, center: float, width: float) -> np.ndarray:
        """(center, width) on the returned scale: MONOCHROME1 mirrors the center too."""
        if self.monochrome1:
            lo, hi = self.value_range()
            center = lo + hi - center
        return np.array([center, width], dtype=np.float64)


@dataclass(frozen=True)
class SliceHeader:
    """What the reader needs from one file's header (no pixels). NaN where a tag is absent."""

    path: Path
    instance_number: int
    position: np.ndarray        # (3,) ImagePositionPatient, mm
    orientation: np.ndarray     # (6,) ImageOrientationPatient
    pixel_spacing: np.ndarray   # (2,) (row spacing, column spacing), mm
    window: np.ndarray          # (2,) first (WindowCenter, WindowWidth), stored-value scale
    rows: int
    columns: int
    photometric: str
    mapping: PixelMapping       # stored value -> returned value
    transfer_syntax_uid: str
    series_instance_uid: str
    series_description: str
    # Anatomy as the header names it ("" when absent); read by data.plausibility.
    body_part_examined: str = ""
    study_description: str = ""
    protocol_name: str = ""

    @property
    def has_geometry(self) -> bool:
        """True when position and orientation are both present and usable."""
        return bool(np.all(np.isfinite(self.position))
                    and np.all(np.isfinite(geometry.slice_normal(self.orientation))))


# --- Reading one file --------------------------------------------------------------------------


class UnusableFileError(Exception):
    """One file cannot contribute a slice; the message is the reason listed in problems."""


class PixelDecodeError(Exception):
    """A slice of a lazily read Volume (``read_series(lazy_pixels=True)``) failed to decode.

    Raised on first access to that slice; reading the series again without ``lazy_pixels``
    drops the file from the stack and lists it in ``Volume.problems`` instead.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: cannot decode pixels ({reason})")
        self.path = path


def _text(value: object) -> str:
    """A text element as str ("" when absent; several values joined by spaces)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return " ".join(str(v).strip() for v in value).strip()
    return str(value).strip()


def _first(value: object) -> object:
    """First item of a multi-valued element, the value itself otherwise.

    Multi-valued WindowCenter/WindowWidth are common; ``int(ds.WindowCenter)`` on them is
    the classic crash.
    """
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0] if len(value) else None
    return value


def _float(value: object, default: float = float("nan")) -> float:
    """A tag value as float (first item if multi-valued); ``default`` if absent or unparsable."""
    value = _first(value)
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _floats(value: object, n: int) -> np.ndarray:
    """A multi-valued tag as an (n,) float array; all NaN if absent or of the wrong length."""
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return np.full(n, np.nan)
    return out if out.shape == (n,) else np.full(n, np.nan)


def _instance_number(ds: Dataset, path: Path) -> tuple[int, str | None]:
    """InstanceNumber, else the file name's number (RSNA names files ``<instance>.dcm``)."""
    value = _float(ds.get("InstanceNumber"))
    if np.isfinite(value):
        return int(value), None
    if re.fullmatch(r"\d+", path.stem):
        return int(path.stem), "no InstanceNumber; taken from the file name"
    raise UnusableFileError("no InstanceNumber and the file name is not a number")


def _open(path: Path, with_pixels: bool) -> Dataset:
    """Parse a file; ``force`` only as a fallback so non-DICOM files get a clear reason."""
    if path.stat().st_size == 0:
        raise UnusableFileError("empty file")
    try:
        return pydicom.dcmread(path, stop_before_pixels=not with_pixels)
    except InvalidDicomError:
        pass  # no 'DICM' preamble: may still be a bare dataset, retried below
    except Exception as e:  # pydicom raises many types on damaged files; none may stop a series
        raise UnusableFileError(f"unreadable DICOM ({type(e).__name__}: {e})") from e
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not with_pixels, force=True)
    except Exception as e:  # same reason as above
        raise UnusableFileError("not a DICOM file") from e
    if "Rows" not in ds or "SOPClassUID" not in ds:
        raise UnusableFileError("not a DICOM file")
    return ds


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    # A bare dataset without file meta is implicit VR little endian by default.
    return str(uid) if uid else pydicom.uid.ImplicitVRLittleEndian


def read_header(path: str | Path, *, with_pixels: bool = False) -> tuple[SliceHeader, Dataset,
                                                                          list[str]]:
    """Read one file's header (and, with ``with_pixels``, its still-encoded pixel data).

    Args:
        path: a DICOM file.
        with_pixels: also read PixelData so it can be decoded later without reopening the
            file; otherwise parsing stops before the pixels (faster on big files).

    Returns:
        ``(header, dataset, notes)``: notes are non-fatal issues (e.g. InstanceNumber taken
        from the file name).

    Raises:
        UnusableFileError: the file cannot give a slice; the message says why.
    """
    path = Path(path)
    ds = _open(path, with_pixels)
    if "Rows" not in ds or "Columns" not in ds:
        raise UnusableFileError("not an image (no Rows/Columns)")
    frames = int(_float(ds.get("NumberOfFrames"), 1.0))
    if frames > 1:
        raise UnusableFileError(f"multi-frame file ({frames} frames) is not supported")
    if int(_float(ds.get("SamplesPerPixel"), 1.0)) != 1:
        raise UnusableFileError("colour image (SamplesPerPixel > 1) is not supported")
    if with_pixels and "PixelData" not in ds:
        raise UnusableFileError("no pixel data")
    instance, note = _instance_number(ds, path)
    header = SliceHeader(
        path=path,
        instance_number=instance,
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        window=np.array([_float(ds.get("WindowCenter")), _float(ds.get("WindowWidth"))]),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper(),
        mapping=PixelMapping.from_dataset(ds),
        transfer_syntax_uid=_transfer_syntax(ds),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        body_part_examined=_text(ds.get("BodyPartExamined")),
        study_description=_text(ds.get("StudyDescription")),
        protocol_name=_text(ds.get("ProtocolName")),
    )
    return header, ds, [note] if note else []


def decode_pixels(ds: Dataset, header: SliceHeader) -> np.ndarray:
    """Decode one slice to float32 values through ``header.mapping`` (see ``PixelMapping``).

    Raises:
        ValueError: (or a decoder's error) when the pixel data cannot be decoded.
    """
    arr = ds.pixel_array  # decoded by whichever installed plugin handles the transfer syntax
    if arr.ndim != 2:
        raise ValueError(f"expected one 2-D frame, got shape {arr.shape}")
    return header.mapping(arr)


def pixel_data_shortfall(ds: Dataset, header: SliceHeader) -> bool:
    """True when an uncompressed file holds fewer PixelData bytes than its header announces.

    The cheap check for a truncated file without decoding it. Compressed (encapsulated)
    pixel data cannot be checked without decoding: False.
    """
    if UID(header.transfer_syntax_uid).is_compressed:
        return False
    data = ds.get("PixelData")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return True
    bits = int(_float(ds.get("BitsAllocated"), 16.0))
    samples = int(_float(ds.get("SamplesPerPixel"), 1.0))
    n = header.rows * header.columns * samples
    expected = (n * bits + 7) // 8
    return len(data) < expected


class LazySlices(Sequence):
    """The slices of a Volume, each decoded from its already-read dataset on first access.

    ``read_series(lazy_pixels=True)`` returns one: a crop that needs 7 of 17 slices decodes
    only those 7. A slice that fails to decode raises :class:`PixelDecodeError`.
    """

    def __init__(self, headers: Sequence[SliceHeader], datasets: dict[Path, Dataset]) -> None:
        self._headers = list(headers)
        self._datasets = {h.path: datasets[h.path] for h in self._headers}
        self._decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._headers)

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        j = int(j)
        if j < 0:
            j += len(self)
        if j not in self._decoded:
            h = self._headers[j]  # IndexError past the end, as for a list
            try:
                self._decoded[j] = decode_pixels(self._datasets.pop(h.path), h)
            except Exception as e:  # a decoder may raise anything on damaged data
                raise PixelDecodeError(h.path, f"{type(e).__name__}: {e}") from e
        return self._decoded[j]

    @property
    def n_decoded(self) -> int:
        """How many slices have been decoded so far."""
        return len(self._decoded)


def read_pixels(path: str | Path) -> np.ndarray:
    """All frames of one file as float32 values (rescaled, MONOCHROME1 inverted).

    For single files outside a series, including multi-frame ones the series reader skips:
    returns (rows, columns) or (frames, rows, columns).

    Raises:
        UnusableFileError: the file is empty, not DICOM or unreadable.
        ValueError: (or a decoder's error) when the pixel data cannot be decoded.
    """
    ds = _open(Path(path), with_pixels=True)
    return PixelMapping.from_dataset(ds)(ds.pixel_array)
