"""spinegrade: grade degenerative lumbar spine conditions from MRI DICOM series."""

__version__ = "0.1.0"
