"""Located levels of a study against its labels, across the stacks of one axial series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinegrade.engine.localization_check import localization_summary, located_errors
from spinegrade.io.dicom import Volume


def _axial_stack(z: list[float], first_instance: int) -> Volume:
    """Axial slices at heights z: rows along +x, columns along +y, 1 mm pixels, (0, 0) at -100."""
    n = len(z)
    return Volume(slices=[], instance_numbers=np.arange(n) + first_instance,
                  positions=np.array([[-100.0, -100.0, zi] for zi in z]),
                  normal_positions=np.asarray(z, dtype=float),
                  orientation=np.array([1.0, 0, 0, 0, 1.0, 0]), normal=np.array([0, 0, 1.0]),
                  pixel_spacing=np.ones((n, 2)), windows=np.full((n, 2), np.nan),
                  series_instance_uid="", series_description="Axial T2",
                  transfer_syntax="", path=Path("axial"), shapes=np.full((n, 2), 200))


def test_located_errors_across_two_stacks_by_hand():
    # One Axial T2 series (id 30) read as two stacks, 5 mm apart: "30" at z = 0, 5, 10
    # (instances 1-3) and "30:1" at z = -50, -45, -40 (instances 11-13).
    volumes = {"30": _axial_stack([0.0, 5.0, 10.0], 1), "30:1": _axial_stack([-50.0, -45.0, -40.0], 11)}
    cond = "left_subarticular_stenosis"
    # Truth: L1/L2 on instance 2 at pixel (100, 100) = patient (0, 0, 5); L2/L3 on instance
    # 12 at (100, 100) = (0, 0, -45) (the second stack).
    truth = pd.DataFrame({"study_id": [9, 9], "series_id": [30, 30], "instance_number": [2, 12],
                          "condition": [cond, cond], "level_idx": [0, 1], "x": [100.0, 100.0],
                          "y": [100.0, 100.0]})
    # Predicted: L1/L2 on instance 3 at (103, 104) = (3, 4, 10): 5 mm in plane, one slice
    # (5 mm) off, 3D sqrt(50). L2/L3 on instance 1 at (100, 100) = (0, 0, 0): 45 mm (9
    # slices) from its own disc but 5 mm from L1/L2's: the wrong disc.
    located = pd.DataFrame({"study_id": ["9", "9"], "series_id": ["30", "30"],
                            "series_description": ["Axial T2", "Axial T2"],
                            "condition": [cond, cond], "level_idx": [0, 1],
                            "instance_number": [3, 1], "x": [103.0, 100.0], "y": [104.0, 100.0],
                            "score": [0.9, 0.8]})
    err = located_errors(located, truth, volumes).set_index("level")
    assert err.loc["l1_l2", "error_mm"] == pytest.approx(5.0)
    assert err.loc["l1_l2", "slice_error"] == 1
    assert err.loc["l1_l2", "error_3d_mm"] == pytest.approx(np.sqrt(50.0))
    assert err.loc["l2_l3", "slice_error"] == 9 and err.loc["l2_l3", "error_mm"] == pytest.approx(0.0)
    table = localization_summary(err.reset_index())
    rows = table.set_index(["series_description", "level"])["wrong_disc_rate"]
    assert rows[("Axial T2", "l1_l2")] == 0.0 and rows[("Axial T2", "l2_l3")] == 1.0
    assert rows[("Axial T2", "all")] == 0.5
    within = table.set_index(["series_description", "level"])["slice_within1"]
    assert within[("Axial T2", "all")] == 0.5
