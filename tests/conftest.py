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
    from spinegrade.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_studies=12, seed=0, progress=False)
    return out
