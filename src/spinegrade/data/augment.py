"""Augmentation on batched tensors, on the training device.

The loader only reads uint8 crops; everything random happens here, on whole batches of shape
(B, S, C, H, W). Each sample draws one geometric transform and one intensity change, and
all S slices of the sample share them (the slices are neighbours in one volume: moving them
independently would break the anatomy the aggregator compares). No flips: left/right matter
for foraminal and subarticular grades, and up/down is anatomy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, C, H, W) -> float in [0, 1] on ``device`` (the copy moves uint8 bytes)."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def channels_last_5d(x: torch.Tensor) -> torch.Tensor:
    """Give each (C, H, W) slice channels-last strides, keeping the (B, S, C, H, W) shape.

    The model folds slices into the batch (B*S, C, H, W); this layout survives that reshape,
    so its convolutions get channels-last input without a copy.
    """
    b, s, c, h, w = x.shape
    return x.reshape(b * s, c, h, w).contiguous(memory_format=torch.channels_last).view(b, s, c, h, w)


def affine_slices(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp every slice of each sample with that sample's affine matrix.

    Args:
        x: (B, S, C, H, W) float.
        theta: (B, 2, 3) matrices mapping output to input coordinates in [-1, 1]
            (``F.affine_grid`` convention).
    """
    b, s, c, h, w = x.shape
    flat = x.reshape(b * s, c, h, w)
    theta = theta.to(device=x.device, dtype=x.dtype).repeat_interleave(s, dim=0)
    grid = F.affine_grid(theta, [b * s, c, h, w], align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(b, s, c, h, w)


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale every slice about its centre (> 1 enlarges the content)."""
    theta = torch.tensor([[1.0 / scale, 0.0, 0.0], [0.0, 1.0 / scale, 0.0]])
    return affine_slices(x, theta.expand(x.shape[0], 2, 3))


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


class BatchAugment:
    """Random rotation, shift, scale, gamma and brightness, one draw per sample.

    Random numbers come from a CPU ``torch.Generator`` passed at call time (a few numbers per
    sample, moved to the device), so the result depends only on that generator's state, on
    any device.

    Args:
        rotate_deg: maximum absolute rotation in degrees.
        shift: maximum absolute translation as a fraction of the image side.
        scale: (min, max) zoom factor; > 1 enlarges the content.
        brightness: multiplicative brightness change drawn from 1 +- brightness.
        gamma: gamma exponent drawn from 1 +- gamma.
        slice_jitter: move the centre slice by up to this many slices (edges repeated), to
            mimic the stage-1 localizer's slice error.
    """

    def __init__(self, rotate_deg: float = 10.0, shift: float = 0.05,
                 scale: tuple[float, float] = (0.9, 1.1), brightness: float = 0.1,
                 gamma: float = 0.1, slice_jitter: int = 0) -> None:
        self.rotate_deg = rotate_deg
        self.shift = shift
        self.scale = scale
        self.brightness = brightness
        self.gamma = gamma
        self.slice_jitter = slice_jitter

    def _theta(self, n: int, generator: torch.Generator) -> torch.Tensor:
        angle = _uniform(n, -self.rotate_deg, self.rotate_deg, generator) * (math.pi / 180.0)
        inv_scale = 1.0 / _uniform(n, self.scale[0], self.scale[1], generator)
        # Normalised coordinates span 2 units per image side.
        tx, ty = (_uniform(n, -2 * self.shift, 2 * self.shift, generator) for _ in range(2))
        cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
        return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)

    def _jitter(self, x: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = x.shape[:2]
        shift = torch.randint(-self.slice_jitter, self.slice_jitter + 1, (b,), generator=generator)
        idx = (torch.arange(s).unsqueeze(0) + shift.unsqueeze(1)).clamp_(0, s - 1).to(x.device)
        # Output slice j shows input slice j + shift: the labelled slice moves to S//2 - shift.
        return torch.gather(x, 1, idx.view(b, s, 1, 1, 1).expand_as(x)), -shift

    def __call__(self, x: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment float (B, S, C, H, W) in [0, 1].

        Returns:
            (augmented batch in [0, 1], ``slice_offset`` (B,) int64: where the labelled slice
            now sits relative to the centre, 0 without slice jitter).
        """
        n = x.shape[0]
        offset = torch.zeros(n, dtype=torch.int64)
        if self.slice_jitter > 0:
            x, offset = self._jitter(x, generator)
        x = affine_slices(x, self._theta(n, generator))
        shape = (n, 1, 1, 1, 1)
        gamma = _uniform(n, 1 - self.gamma, 1 + self.gamma, generator).view(shape)
        gain = _uniform(n, 1 - self.brightness, 1 + self.brightness, generator).view(shape)
        x = x.clamp(0.0, 1.0).pow(gamma.to(x.device, x.dtype)) * gain.to(x.device, x.dtype)
        return x.clamp_(0.0, 1.0), offset.to(x.device)


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix each sample with a random partner.

    Returns:
        (mixed batch, partner index per sample, weight ``lam`` of the original sample).
        Train against ``lam * loss(y) + (1 - lam) * loss(y[perm])``, i.e. soft targets.
    """
    lam = _beta(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch.distributions takes no generator; seed numpy's Beta from ours instead.
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
