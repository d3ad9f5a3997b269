"""Self-describing checkpoints, written atomically and read with ``weights_only=True``.

A checkpoint holds only tensors and primitive containers, so loading never unpickles code:
model (and optimizer, SWA, schedule) state, epoch, RNG states, the resolved config as a
dict, class names and a format version. What the payload holds, and where each checkpoint
lives in a run folder, is :mod:`spinegrade.engine.run_folder`'s.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spinegrade.constants import CLASS_NAMES
from spinegrade.errors import UserError
from spinegrade.io.atomic import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Add ``format_version`` and ``class_names`` to ``payload`` and write it atomically."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, "class_names": list(CLASS_NAMES), **payload}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check its format and class names."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which, not a pickle traceback
        raise UserError(f"{path}: not a readable spinegrade checkpoint ({e})") from None
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {version}, this spinegrade reads "
                        f"{FORMAT_VERSION}; retrain or use a matching version")
    if tuple(ckpt.get("class_names", ())) != CLASS_NAMES:
        raise UserError(f"{path}: class names {ckpt.get('class_names')} differ from {CLASS_NAMES}")
    return ckpt


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) and loader-generator RNG states, weights_only-safe."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` saved."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])
