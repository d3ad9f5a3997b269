"""Shared fixtures: a small synthetic RSNA-format dataset, generated once per test session."""

from __future__ import annotations

import os

import pytest

# Keep the suite light on 2-core CI machines and free of network access.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A 12-study synthetic dataset (plus test studies) in the RSNA 2024 layout."""
    from spinegrade.data.synthetic import SynthOptions, generate

    out = tmp_path_factory.mktemp("synth")
    # Matrices capped at 256 px keep the fixture quick; geometry and labels are unchanged.
    generate(out, n_studies=12, seed=0, progress=False, options=SynthOptions(max_matrix=256))
    return out
