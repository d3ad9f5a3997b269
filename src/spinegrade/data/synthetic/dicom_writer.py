"""Write one rendered slice as an MR Image Storage DICOM file (Explicit VR Little Endian).

Files are deterministic: UIDs derive from the study/series ids, and no dates or times are
written (the RSNA files are anonymised the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from spinegrade.data.synthetic.geometry import SeriesGeom, SliceGeom
from spinegrade.data.synthetic.render import Appearance

# Sequence parameters written per contrast: (TR ms, TE ms, TI ms or None, sequence name).
_SEQUENCE = {"t1": (550.0, 10.0, None, "T1 TSE"), "t2": (3500.0, 105.0, None, "T2 TSE"),
             "stir": (4000.0, 60.0, 150.0, "STIR TSE")}


@dataclass(frozen=True)
class Encoding:
    """How a series stores its values: photometric interpretation, rescale, windows, bits."""

    monochrome1: bool
    rescale: tuple[float, float] | None  # (slope, intercept); None: tags absent
    windows: tuple[tuple[float, ...], tuple[float, ...]] | None  # (centres, widths)
    bits_stored: int
    spacing_tag: bool  # whether SpacingBetweenSlices is written


def sample_encoding(rng: np.random.Generator, look: Appearance, p_monochrome1: float) -> Encoding:
    """Random but plausible storage choices for one series."""
    rescale = None
    r = rng.random()
    if r < 0.25:
        rescale = (1.0, 0.0)
    elif r < 0.4:
        rescale = (round(float(rng.uniform(1.0, 3.0)), 4), float(rng.choice([0.0, -100.0])))
    windows = None
    r = rng.random()
    centre, width = round(0.45 * look.scale, 1), round(0.95 * look.scale, 1)
    if r < 0.5:
        windows = ((centre,), (width,))
    elif r < 0.7:  # multi-valued, as some scanners write them
        windows = ((centre, round(centre * 1.2, 1)), (width, round(width * 1.5, 1)))
    return Encoding(
        monochrome1=bool(rng.random() < p_monochrome1), rescale=rescale, windows=windows,
        bits_stored=12 if look.max_value == 4095 else 16, spacing_tag=bool(rng.random() < 0.8),
    )


def ds_str(value: float) -> str:
    """A decimal string (DS) with at most 5 decimals and no trailing zeros."""
    text = f"{float(value) + 0.0:.5f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def stored_values(signal: np.ndarray, enc: Encoding) -> np.ndarray:
    """uint16 stored pixel values for a signal image, honouring rescale and MONOCHROME1."""
    top = (1 << enc.bits_stored) - 1
    values = signal
    if enc.rescale is not None:
        slope, intercept = enc.rescale
        values = (signal - intercept) / slope
    values = np.clip(np.rint(values), 0, top)
    if enc.monochrome1:
        values = top - values
    return values.astype(np.uint16)


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _geometry_tags(ds: Dataset, geom: SliceGeom, series: SeriesGeom, enc: Encoding) -> None:
    ds.ImagePositionPatient = [ds_str(v) for v in geom.position]
    ds.ImageOrientationPatient = [ds_str(v) for v in (*geom.row_dir, *geom.col_dir)]
    ds.PixelSpacing = [ds_str(v) for v in geom.spacing]
    ds.SliceThickness = ds_str(series.thickness)
    if enc.spacing_tag:
        ds.SpacingBetweenSlices = ds_str(series.spacing_between)
    ds.SliceLocation = ds_str(float(geom.position @ geom.normal))
    ds.Rows, ds.Columns = geom.rows, geom.cols


def _value_tags(ds: Dataset, pixels: np.ndarray, enc: Encoding) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if enc.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, enc.bits_stored, enc.bits_stored - 1
    ds.PixelRepresentation = 0
    if enc.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = ds_str(enc.rescale[0]), ds_str(enc.rescale[1])
        ds.RescaleType = "US"
    if enc.windows is not None:
        centres, widths = ([ds_str(v) for v in vals] for vals in enc.windows)
        ds.WindowCenter = centres if len(centres) > 1 else centres[0]
        ds.WindowWidth = widths if len(widths) > 1 else widths[0]
    ds.PixelData = pixels.tobytes()


def write_instance(
    path: Path, signal: np.ndarray, geom: SliceGeom, series: SeriesGeom, *,
    study_id: int, series_id: int, series_number: int, instance_number: int,
    contrast: str, enc: Encoding,
) -> None:
    """Write one slice to ``path`` (parent folders are created)."""
    sop_uid = f"{study_id}.{series_id}.{instance_number}"
    ds = Dataset()
    ds.file_meta = _file_meta(sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.Modality, ds.BodyPartExamined = "MR", "LSPINE"
    ds.PatientID, ds.PatientName = str(study_id), str(study_id)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = str(study_id), str(series_id)
    ds.FrameOfReferenceUID = f"{study_id}.1"
    ds.SeriesDescription, ds.SeriesNumber = series.description, series_number
    ds.InstanceNumber = instance_number
    tr, te, ti, name = _SEQUENCE[contrast]
    ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "SK", "2D"
    ds.SequenceName, ds.RepetitionTime, ds.EchoTime = name, ds_str(tr), ds_str(te)
    if ti is not None:
        ds.ScanningSequence = ["SE", "IR"]
        ds.InversionTime = ds_str(ti)
    ds.MagneticFieldStrength = "1.5"
    _geometry_tags(ds, geom, series, enc)
    _value_tags(ds, stored_values(signal, enc), enc)
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
