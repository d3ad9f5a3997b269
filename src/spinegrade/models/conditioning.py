"""Level conditioning: tell the network which disc level (L1/L2 .. L5/S1) it is grading."""

from __future__ import annotations

import torch
from torch import nn


class LevelEmbedding(nn.Module):
    """v8: a learned ``embed_dim`` vector per level, concatenated to the pooled features.

    Args:
        num_levels: Number of disc levels (5).
        embed_dim: Embedding size (256 in v8: 5 x 256 = 1,280 parameters).
    """

    def __init__(self, num_levels: int, embed_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_levels, embed_dim)
        self.embed_dim = embed_dim

    def out_features(self, in_features: int) -> int:
        """Size of the concatenated output."""
        return in_features + self.embed_dim

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.embed(level).to(x.dtype)], dim=-1)


class LevelFiLM(nn.Module):
    """v5/v6: feature-wise linear modulation, ``x * (1 + gamma[level]) + beta[level]``.

    Gamma and beta start at zero, so the module is the identity at initialisation. Works on
    (B, F) or (B, S, F) inputs (broadcast over slices). Parameters: ``2 * num_levels * F``
    (12,800 for F=1280).

    Args:
        num_levels: Number of disc levels (5).
        num_features: F, the size of the features being modulated.
    """

    def __init__(self, num_levels: int, num_features: int) -> None:
        super().__init__()
        self.gamma = nn.Embedding(num_levels, num_features)
        self.beta = nn.Embedding(num_levels, num_features)
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma(level).to(x.dtype), self.beta(level).to(x.dtype)
        if x.dim() == 3:
            gamma, beta = gamma.unsqueeze(1), beta.unsqueeze(1)
        return x * (1 + gamma) + beta
