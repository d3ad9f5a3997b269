"""Test-time augmentation: brightness and scale views only (no flips), probabilities averaged."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from spinegrade.data.augment import zoom

View = Callable[[torch.Tensor], torch.Tensor]


def _brightness(factor: float) -> View:
    return lambda x: (x * factor).clamp_(0.0, 1.0)


def _scale(factor: float) -> View:
    return lambda x: zoom(x, factor)


def tta_views(brightness: Sequence[float] = (), scales: Sequence[float] = ()) -> list[View]:
    """The identity view plus one view per brightness factor and per scale factor."""
    return ([lambda x: x] + [_brightness(b) for b in brightness] + [_scale(s) for s in scales])


@torch.no_grad()
def predict_views(model: torch.nn.Module, x: torch.Tensor, level: torch.Tensor,
                  views: Sequence[View]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Class probabilities averaged over ``views``, and the first view's model outputs.

    ``model`` is the bare model (not DDP-wrapped): it must offer ``probabilities(logits)``.
    The first view should be the identity (as :func:`tta_views` makes it), so its outputs
    give the validation loss.
    """
    first: dict[str, torch.Tensor] | None = None
    probs = None
    for view in views:
        outputs = model(view(x), level)
        p = model.probabilities(outputs["logits"].float()).float()
        probs = p if probs is None else probs + p
        first = outputs if first is None else first
    return probs / len(views), first
