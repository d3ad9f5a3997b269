"""Slice aggregators: (B, S, F) per-slice features -> (B, out_features) one vector per crop.

Every aggregator returns ``(pooled, attention)`` where ``attention`` is the (B, S) weight
each slice received (or None), so the net can expose it for plotting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SliceAggregator(nn.Module):
    """v8: one learnable weight per slice position, softmax over slices, weighted sum.

    The weights do not depend on the input; the centre position starts at
    ``centre_weight_init`` and the others at 0, so the centre slice (where the level was
    located) dominates at initialisation.

    Args:
        num_features: F, the per-slice feature size (also the output size).
        n_slices: S, number of slices in a crop stack; the centre is ``S // 2``.
        centre_weight_init: Initial logit of the centre position.
    """

    def __init__(self, num_features: int, n_slices: int, centre_weight_init: float = 1.0) -> None:
        super().__init__()
        self.out_features = num_features
        init = torch.zeros(n_slices)
        init[n_slices // 2] = centre_weight_init
        self.position_logits = nn.Parameter(init)

    def slice_weights(self) -> torch.Tensor:
        """(S,) softmax weights over slice positions."""
        return self.position_logits.softmax(0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.slice_weights().to(x.dtype)
        return torch.einsum("bsf,s->bf", x, w), w.expand(x.shape[0], -1)


class AttentionPool(nn.Module):
    """Attention pooling: a small MLP scores each slice, softmax over slices, weighted sum.

    ``gated=True`` is the gated attention of Ilse et al. 2018 (attention-based deep MIL):
    ``a_s = w^T (tanh(V h_s) * sigmoid(U h_s))``; ``gated=False`` is ``w^T tanh(V h_s)``.

    Args:
        num_features: Input (and output) feature size.
        hidden: Width of the scoring MLP.
        gated: Use the sigmoid gate.
    """

    def __init__(self, num_features: int, hidden: int = 128, gated: bool = True) -> None:
        super().__init__()
        self.out_features = num_features
        self.attn_v = nn.Linear(num_features, hidden)
        self.attn_u = nn.Linear(num_features, hidden) if gated else None
        # No bias: softmax over slices ignores a constant shift, so it would never learn.
        self.attn_w = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.attn_v(x))
        if self.attn_u is not None:
            h = h * torch.sigmoid(self.attn_u(x))
        a = self.attn_w(h).squeeze(-1).softmax(dim=1)  # (B, S)
        return torch.einsum("bsf,bs->bf", x, a), a


class RecurrentAttentionPool(nn.Module):
    """Bidirectional LSTM/GRU over the slices, then attention pooling (v5, 1st-place style).

    Args:
        num_features: F, per-slice feature size.
        hidden: Hidden size per direction; output size is ``2 * hidden``.
        cell: "lstm" or "gru".
        gated: Gated (Ilse et al.) attention instead of plain tanh attention.
    """

    def __init__(self, num_features: int, hidden: int = 256, cell: str = "gru",
                 gated: bool = False) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(num_features, hidden, batch_first=True, bidirectional=True)
        self.pool = AttentionPool(2 * hidden, hidden=hidden, gated=gated)
        self.out_features = 2 * hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq, _ = self.rnn(x)
        return self.pool(seq)


class RecurrentSelfAttentionMean(nn.Module):
    """v4: bidirectional LSTM, one self-attention block (residual + LayerNorm), mean over slices.

    Args:
        num_features: F, per-slice feature size.
        hidden: Hidden size per direction; output size is ``2 * hidden``.
        num_heads: Heads of the self-attention; must divide ``2 * hidden``.
    """

    def __init__(self, num_features: int, hidden: int = 256, num_heads: int = 4) -> None:
        super().__init__()
        self.rnn = nn.LSTM(num_features, hidden, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(2 * hidden, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.out_features = 2 * hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        seq, _ = self.rnn(x)
        attended, _ = self.attn(seq, seq, seq, need_weights=False)
        return self.norm(seq + attended).mean(dim=1), None


class Identity(nn.Module):
    """No aggregation: the input is already one vector per crop (v7's 2.5D stem)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.out_features = num_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None


# model.aggregator -> builder(num_features, n_slices, hidden, num_heads, centre_weight_init);
# the names are spinegrade.choices.AGGREGATORS, which config validation uses.
AGGREGATOR_BUILDERS: dict[str, Callable[[int, int, int, int, float], nn.Module]] = {
    "softmax_weights": lambda f, s, h, nh, c: SliceAggregator(f, s, c),
    "bilstm_attn_mean": lambda f, s, h, nh, c: RecurrentSelfAttentionMean(f, h, nh),
    "bigru_attn": lambda f, s, h, nh, c: RecurrentAttentionPool(f, h, cell="gru", gated=False),
    "attention_mil": lambda f, s, h, nh, c: AttentionPool(f, h, gated=True),
    "bilstm_attention": lambda f, s, h, nh, c: RecurrentAttentionPool(f, h, cell="lstm", gated=True),
    "none": lambda f, s, h, nh, c: Identity(f),
}


def create_aggregator(
    name: str,
    *,
    num_features: int,
    n_slices: int,
    hidden: int = 256,
    num_heads: int = 4,
    centre_weight_init: float = 1.0,
) -> nn.Module:
    """Build an aggregator by name (``model.aggregator``); see ``docs/models.md``."""
    if name not in AGGREGATOR_BUILDERS:
        raise ValueError(f"unknown aggregator '{name}'")
    return AGGREGATOR_BUILDERS[name](num_features, n_slices, hidden, num_heads, centre_weight_init)
