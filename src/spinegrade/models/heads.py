"""Classification heads (softmax and CORAL ordinal), prior bias initialisation and decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The final layer starts with tiny weights, so the initial logits equal the prior bias up
# to a small input-dependent term while every upstream parameter still gets a gradient.
FINAL_WEIGHT_STD = 1e-3


def log_prior_logits(class_counts: Sequence[float]) -> tuple[float, ...]:
    """Softmax bias whose probabilities equal the class frequencies: ``log(n_c / N)``.

    Empty classes count as 1 so the bias stays finite.
    """
    counts = torch.tensor([max(float(c), 1.0) for c in class_counts], dtype=torch.float64)
    return tuple((counts / counts.sum()).log().tolist())


def coral_prior_logits(class_counts: Sequence[float]) -> tuple[float, ...]:
    """CORAL biases whose sigmoids equal the frequencies ``P(Y > k)``, k = 0..K-2."""
    counts = torch.tensor([max(float(c), 1.0) for c in class_counts], dtype=torch.float64)
    above = counts.flip(0).cumsum(0).flip(0)[1:] / counts.sum()  # P(Y > k)
    return tuple(torch.logit(above).tolist())


def coral_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Decode CORAL logits (B, K-1) of ``P(Y > k)`` into class probabilities (B, K).

    The cumulative probabilities are made monotone with a running minimum
    (``P(Y > k) <= P(Y > k-1)``), so the result is a valid distribution (non-negative,
    summing to 1) even when the learned thresholds cross. For K = 3:
    ``p0 = s(l0); p1 = min(s(l1), p0); probs = [1 - p0, p0 - p1, p1]``.
    """
    above = torch.sigmoid(logits.float()).cummin(dim=-1).values
    ones = torch.ones_like(above[..., :1])
    zeros = torch.zeros_like(above[..., :1])
    cum = torch.cat([ones, above, zeros], dim=-1)  # P(Y > k-1) for k = 0..K
    return (cum[..., :-1] - cum[..., 1:]).clamp_min(0.0)


class ClassifierHead(nn.Module):
    """Dropout -> (optional hidden layer) -> linear; the bias starts at the class prior.

    Args:
        in_features: Input size.
        num_classes: Number of logits.
        prior_bias: Initial bias of the final layer (length ``num_classes``); kept as a
            buffer so :meth:`reset_bias` can restore it.
        hidden: Width of an optional hidden layer (0: none).
        dropout: Dropout before each linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, prior_bias: Sequence[float],
                 hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if len(prior_bias) != num_classes:
            raise ValueError(f"prior bias has {len(prior_bias)} values, expected {num_classes}")
        self.num_classes = num_classes
        self.drop = nn.Dropout(dropout)
        self.hidden = (nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout))
                       if hidden > 0 else nn.Identity())
        self.fc = nn.Linear(hidden if hidden > 0 else in_features, num_classes)
        self.register_buffer("prior_bias", torch.tensor(list(prior_bias), dtype=torch.float32))
        nn.init.trunc_normal_(self.fc.weight, std=FINAL_WEIGHT_STD)
        self.reset_bias()

    @torch.no_grad()
    def reset_bias(self) -> None:
        """Set the final bias back to the configured prior."""
        self.fc.bias.copy_(self.prior_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.drop(x)))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes."""
        return F.softmax(logits.float(), dim=-1)


class CoralHead(nn.Module):
    """CORAL ordinal head (Cao et al. 2020): one shared weight vector, K-1 ordered biases.

    Logit ``k`` models ``P(Y > k)``; sharing the weights keeps the thresholds rank-consistent
    in expectation. Outputs (B, K-1) logits; :meth:`probabilities` decodes to (B, K).

    Args:
        in_features: Input size.
        num_classes: K, number of ordered classes (outputs K-1 logits).
        prior_bias: Initial biases (length K-1), e.g. ``CORAL_PRIOR_LOGITS``.
        hidden: Width of an optional hidden layer (0: none).
        dropout: Dropout before each linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, prior_bias: Sequence[float],
                 hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if len(prior_bias) != num_classes - 1:
            raise ValueError(f"CORAL bias has {len(prior_bias)} values, expected {num_classes - 1}")
        self.num_classes = num_classes
        self.drop = nn.Dropout(dropout)
        self.hidden = (nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout))
                       if hidden > 0 else nn.Identity())
        self.fc = nn.Linear(hidden if hidden > 0 else in_features, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_classes - 1))
        self.register_buffer("prior_bias", torch.tensor(list(prior_bias), dtype=torch.float32))
        nn.init.trunc_normal_(self.fc.weight, std=FINAL_WEIGHT_STD)
        self.reset_bias()

    @torch.no_grad()
    def reset_bias(self) -> None:
        """Set the thresholds back to the configured prior."""
        self.bias.copy_(self.prior_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.drop(x))) + self.bias

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Valid (B, K) class distribution from the (B, K-1) logits."""
        return coral_to_probs(logits)


@torch.no_grad()
def random_init_(head: nn.Module) -> None:
    """``model.head_init=random``: nn.Linear's default initialisation of the final layer.

    Weights and bias uniform in +-1/sqrt(fan_in) (CORAL: its thresholds as well), so the
    initial probabilities depend on the input and are not the prior; the prior stays in
    ``prior_bias`` for ``reset_bias`` (the dead-class action).
    """
    head.fc.reset_parameters()
    if isinstance(head, CoralHead):
        bound = 1.0 / head.fc.in_features ** 0.5
        head.bias.uniform_(-bound, bound)


# model.head -> head class; the names are spinegrade.choices.HEADS, which config validation uses.
HEAD_CLASSES: dict[str, type[nn.Module]] = {"softmax": ClassifierHead, "coral": CoralHead}
