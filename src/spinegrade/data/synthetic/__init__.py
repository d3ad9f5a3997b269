"""Synthetic datasets in the RSNA 2024 Lumbar Spine layout, for the demo, tests and benchmarks.

A per-study analytic phantom (``anatomy``) is sampled on each DICOM slice's pixel grid
(``geometry``, ``render``), so pixels and headers agree by construction; severities are real
narrowings of the canal, foramina and lateral recesses.
"""

from spinegrade.data.synthetic.generate import SynthSummary, generate
from spinegrade.data.synthetic.labels import DIFFICULTIES, GRADE_RANGES, resolve_balance
from spinegrade.data.synthetic.study import SynthOptions

__all__ = ["DIFFICULTIES", "GRADE_RANGES", "SynthOptions", "SynthSummary", "generate", "resolve_balance"]
