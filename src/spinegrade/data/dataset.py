"""A torch Dataset over a prepared crop cache (no decoding, no preprocessing at load time)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from spinegrade.data.cache import CropCache


class CropDataset(Dataset):
    """Samples of a :class:`CropCache`, optionally a subset of its rows (e.g. one fold).

    Each item is ``dict(image=uint8 tensor (S, 3, H, W), level=int64, label=int64,
    row=int64, study_id=int64)``; ``row`` is the position in the cache, so predictions can
    be joined back to ``cache.index``. Conversion to float and augmentation belong to the
    caller (``transform`` receives and returns the item dict).

    Args:
        cache: an opened cache (pickled by path, so DataLoader workers re-open the memmap).
        rows: cache rows to use, in this order; ``None``: all.
        transform: optional callable applied to each item dict.
    """

    def __init__(self, cache: CropCache, rows: Sequence[int] | np.ndarray | None = None,
                 transform: Callable[[dict], dict] | None = None) -> None:
        self.cache = cache
        n = len(cache.index)
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n):
            raise IndexError(f"rows must lie in [0, {n}), got {self.rows.min()}..{self.rows.max()}")
        index = cache.index.iloc[self.rows]  # ``row`` == position (CropCache invariant)
        self.levels = index["level_idx"].to_numpy(np.int64)
        self.labels = index["label"].to_numpy(np.int64)
        self.study_ids = index["study_id"].to_numpy(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[i])
        item = {
            "image": torch.from_numpy(np.array(self.cache.crops[row])),  # copy out of the memmap
            "level": torch.tensor(self.levels[i], dtype=torch.int64),
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "row": torch.tensor(row, dtype=torch.int64),
            "study_id": torch.tensor(self.study_ids[i], dtype=torch.int64),
        }
        return self.transform(item) if self.transform is not None else item
