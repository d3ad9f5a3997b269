"""Helpers for the engine tests: a tiny learnable crop cache and a tiny CPU config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.config import Config, load_config
from spinegrade.constants import LEVELS

TINY_OVERRIDES = (
    "model.backbone=test_efficientnet", "model.pretrained=false", "data.img_size=32",
    "data.num_workers=0", "data.folds=3", "train.batch_size=8", "eval.batch_size=16",
    "train.epochs=4", "train.swa_start_epoch=3", "train.log_every=0", "train.device=cpu",
)


def make_cache(path: Path, n_studies: int = 12, img: int = 32, n_slices: int = 7, seed: int = 0):
    """A CropCache whose label is visible as the brightness of a central square."""
    from spinegrade.data.cache import CropCache

    rng = np.random.default_rng(seed)
    rows, crops = [], []
    for st in range(n_studies):
        for lv, name in enumerate(LEVELS):
            label = int(rng.choice(3, p=[0.6, 0.25, 0.15]))
            rows.append({"study_id": 1000 + st, "level": name, "level_idx": lv, "label": label})
            x = rng.integers(0, 60, (n_slices, 3, img, img))
            x[:, :, img // 4: 3 * img // 4, img // 4: 3 * img // 4] += 90 * label
            crops.append(x.astype(np.uint8))
    return CropCache.create(path, np.stack(crops), pd.DataFrame(rows),
                            {"img_size": img, "n_slices": n_slices})


def tiny_config(*overrides: str) -> Config:
    """The v8 config shrunk to a CPU-sized run (plus ``overrides``)."""
    return load_config("v8", [*TINY_OVERRIDES, *overrides])


def cli_args(*overrides: str) -> list[str]:
    """``--set`` arguments for the CLI equal to :func:`tiny_config`."""
    out: list[str] = []
    for o in (*TINY_OVERRIDES, *overrides):
        out += ["--set", o]
    return out
