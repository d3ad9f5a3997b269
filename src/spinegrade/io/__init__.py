"""File-level I/O: DICOM series reading and atomic writes. No torch, no training code."""
