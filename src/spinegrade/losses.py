"""Training objectives: competition-weighted (focal) CE, CORAL, cumulative ordinal, auxiliary,
and the localizer's heatmap focal loss (:func:`focal_heatmap_loss`).

Targets are either int64 class indices (B,) or soft targets (B, C) (mixup). With soft
targets ``q``, every term is the ``q``-weighted sum of its one-hot values, so a one-hot ``q``
gives exactly the hard-label loss.

The weighted focal cross entropy, with class weights ``w`` (``CLASS_WEIGHTS`` = [1, 2, 4],
the competition's sample weights) and focusing parameter ``gamma``::

    loss = sum_b w[y_b] * (1 - p_b[y_b]) ** gamma * -log p_b[y_b]  /  sum_b w[y_b]

With ``gamma = 0`` this is ``F.cross_entropy(logits, y, weight=w)`` exactly (its 'mean'
reduction also divides by the summed weights). Soft targets: ``w[y_b]`` becomes
``q_bc * w[c]`` summed over classes c.

``focal_form="plan"`` is the plan's snippet, which takes ``pt = exp(-ce)`` of the already
class-weighted CE, so ``pt = p ** w`` and the modulation is ``(1 - p_b[y_b] ** w[y_b]) **
gamma``: a Severe sample (w = 4) counts as less well classified than its probability says.
Both forms are equal when all weights are 1 (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spinegrade.choices import FOCAL_FORMS
from spinegrade.config import ConfigError, LossConfig
from spinegrade.constants import CLASS_WEIGHTS
from spinegrade.models.heads import coral_to_probs

# Decoded CORAL probabilities can be exactly 0 when thresholds cross; log needs a floor.
_PROB_FLOOR = 1e-7


def soft_targets(target: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class indices or (B, C) probabilities -> (B, C) float probabilities."""
    q = F.one_hot(target.long(), num_classes).float() if target.dim() == 1 else target.float()
    if label_smoothing > 0:
        q = q * (1 - label_smoothing) + label_smoothing / num_classes
    return q


def _class_weights(weights: Sequence[float] | None, num_classes: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(num_classes)
    if len(weights) != num_classes:
        raise ValueError(f"{len(weights)} class weights for {num_classes} classes")
    return torch.tensor(list(weights), dtype=torch.float32)


def weighted_mean(per_class: torch.Tensor, q: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_bc q_bc w_c L_bc / sum_bc q_bc w_c`` for a (B, C) per-class loss ``L``."""
    qw = q * weights.to(q.device)
    return (qw * per_class).sum() / qw.sum().clamp_min(1e-12)


class CompetitionWeightedCE(nn.Module):
    """Class-weighted cross entropy with optional focal modulation (formula: module doc).

    Args:
        class_weights: Weight per true class (``CLASS_WEIGHTS``), or None for unweighted.
        gamma: Focal focusing parameter; 0 is plain weighted CE.
        label_smoothing: Mixes the targets with the uniform distribution by this amount.
        num_classes: Number of classes.
    """

    def __init__(self, class_weights: Sequence[float] | None = CLASS_WEIGHTS, gamma: float = 0.0,
                 label_smoothing: float = 0.0, num_classes: int = len(CLASS_WEIGHTS),
                 focal_form: str = "textbook") -> None:
        super().__init__()
        if focal_form not in FOCAL_FORMS:
            raise ConfigError(f"loss.focal_form: '{focal_form}' is not one of {', '.join(FOCAL_FORMS)}")
        self.register_buffer("class_weights", _class_weights(class_weights, num_classes))
        self.gamma, self.label_smoothing, self.num_classes = gamma, label_smoothing, num_classes
        self.focal_form = focal_form

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for (B, C) logits and (B,) or (B, C) targets."""
        return self.forward_log_probs(F.log_softmax(logits.float(), dim=-1), target)

    def forward_log_probs(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Same loss from (B, C) log-probabilities (e.g. decoded CORAL outputs)."""
        q = soft_targets(target, self.num_classes, self.label_smoothing)
        nll = -log_probs
        if self.gamma > 0:
            # plan: pt = exp(-w * nll) = p ** w, the snippet's exp(-weighted ce)
            scale = self.class_weights.to(log_probs.device) if self.focal_form == "plan" else 1.0
            # clamp: (1 - p) ** gamma has an infinite slope at p = 1 for gamma < 1
            nll = nll * (1 - (log_probs * scale).exp()).clamp_min(1e-12) ** self.gamma
        return weighted_mean(nll, q, self.class_weights)


def _cumulative_targets(q: torch.Tensor) -> torch.Tensor:
    """(B, C) class probabilities -> (B, C-1) ``P(Y > k)``."""
    return q.flip(-1).cumsum(-1).flip(-1)[:, 1:]


class _ClassWeightedLoss(nn.Module):
    """Base of the ordinal losses: a class-weight buffer and the number of classes."""

    def __init__(self, class_weights: Sequence[float] | None = None,
                 num_classes: int = len(CLASS_WEIGHTS)) -> None:
        super().__init__()
        self.register_buffer("class_weights", _class_weights(class_weights, num_classes))
        self.num_classes = num_classes


class CoralLoss(_ClassWeightedLoss):
    """CORAL loss: binary cross entropy of each ``P(Y > k)`` logit against ``1[y > k]``.

    Summed over the K-1 thresholds, averaged over samples with the class weights.

    Args:
        class_weights: Weight per true class, or None.
        num_classes: K.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        q = soft_targets(target, self.num_classes)
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), _cumulative_targets(q), reduction="none").sum(-1, keepdim=True)
        return weighted_mean(bce.expand_as(q), q, self.class_weights)


class CumulativeOrdinalLoss(_ClassWeightedLoss):
    """Ordinal term for a softmax head: BCE of the implied ``P(Y > k) = sum_{c>k} p_c``.

    Unlike CE, predicting Normal for a Severe case costs more than predicting Moderate.

    Args:
        class_weights: Weight per true class, or None.
        num_classes: K.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        q = soft_targets(target, self.num_classes)
        log_p = F.log_softmax(logits.float(), dim=-1)
        k = self.num_classes - 1
        log_above = torch.stack([log_p[:, i + 1:].logsumexp(-1) for i in range(k)], -1)
        log_below = torch.stack([log_p[:, :i + 1].logsumexp(-1) for i in range(k)], -1)
        t = _cumulative_targets(q)
        bce = -(t * log_above + (1 - t) * log_below).sum(-1, keepdim=True)
        return weighted_mean(bce.expand_as(q), q, self.class_weights)


def aux_loss(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """v4's auxiliary terms: CE of ``aux_level`` vs ``level`` + CE of ``aux_slice`` vs the slice.

    The labelled slice sits at index ``S // 2 + slice_offset`` (``batch['slice_offset']``,
    default 0: the stack is centred on it).
    """
    if "aux_level" not in outputs and "aux_slice" not in outputs:
        raise ConfigError("loss.aux_weight > 0 but the model has no auxiliary heads; "
                          "set model.aux_heads=true or loss.aux_weight=0")
    total = torch.zeros((), device=batch["level"].device)
    if "aux_level" in outputs:
        total = total + F.cross_entropy(outputs["aux_level"].float(), batch["level"].long())
    if "aux_slice" in outputs:
        s = outputs["aux_slice"].shape[1]
        target = torch.full_like(batch["level"].long(), s // 2)
        if "slice_offset" in batch:
            target = (target + batch["slice_offset"].long()).clamp(0, s - 1)
        total = total + F.cross_entropy(outputs["aux_slice"].float(), target)
    return total


class GradingLoss(nn.Module):
    """The training objective: ``main + ordinal_weight * ordinal + aux_weight * aux``.

    Called as ``loss(outputs, batch)``: ``outputs['logits']`` from the model; the target is
    ``batch['label_soft']`` (B, C) when present (mixup), else ``batch['label']`` (B,).

    Args:
        main: Weighted (focal) CE, on softmax or on decoded CORAL probabilities.
        head: "softmax" or "coral", the model's head type.
        ordinal: CORAL or cumulative ordinal term, or None.
        ordinal_weight: Its weight.
        aux_weight: Weight of :func:`aux_loss` (0: off).
    """

    def __init__(self, main: CompetitionWeightedCE, head: str = "softmax",
                 ordinal: nn.Module | None = None, ordinal_weight: float = 0.0,
                 aux_weight: float = 0.0) -> None:
        super().__init__()
        self.main, self.ordinal, self.head = main, ordinal, head
        self.ordinal_weight, self.aux_weight = ordinal_weight, aux_weight

    def components(self, outputs: Mapping[str, torch.Tensor],
                   batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every term and their weighted ``total``, for logging."""
        logits = outputs["logits"]
        target = batch["label_soft"] if "label_soft" in batch else batch["label"]
        if self.head == "coral":
            log_p = coral_to_probs(logits).clamp_min(_PROB_FLOOR).log()
            terms = {"main": self.main.forward_log_probs(log_p, target)}
        else:
            terms = {"main": self.main(logits, target)}
        total = terms["main"]
        if self.ordinal is not None:
            terms["ordinal"] = self.ordinal(logits, target)
            total = total + self.ordinal_weight * terms["ordinal"]
        if self.aux_weight > 0:
            terms["aux"] = aux_loss(outputs, batch)
            total = total + self.aux_weight * terms["aux"]
        terms["total"] = total
        return terms

    def forward(self, outputs: Mapping[str, torch.Tensor],
                batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.components(outputs, batch)["total"]


def build_loss(cfg: LossConfig, head: str = "softmax") -> GradingLoss:
    """Build the objective a ``LossConfig`` describes, for a model with the given head.

    - ``weighted_ce``: (focal) weighted CE only (v4, v5, v8).
    - ``coral_ce``: CE on the decoded CORAL probabilities + ``ordinal_weight`` x CORAL (v6).
    - ``focal_ordinal``: (focal) CE + ``ordinal_weight`` x the ordinal term (v7).

    Raises:
        ConfigError: The loss and head do not fit together, or an ordinal loss has no weight.
    """
    if head not in ("softmax", "coral"):
        raise ConfigError(f"unknown head '{head}'")
    if cfg.name == "coral_ce" and head != "coral":
        raise ConfigError("loss.name=coral_ce needs model.head=coral")
    if cfg.name in ("coral_ce", "focal_ordinal") and cfg.ordinal_weight <= 0:
        raise ConfigError(f"loss.name={cfg.name} needs loss.ordinal_weight > 0")
    if cfg.name == "weighted_ce" and cfg.ordinal_weight > 0:
        raise ConfigError("loss.ordinal_weight is set but loss.name=weighted_ce has no ordinal "
                          "term; use focal_ordinal or coral_ce")
    weights = cfg.class_weights if cfg.use_class_weights else None
    num_classes = len(cfg.class_weights)
    main = CompetitionWeightedCE(weights, cfg.focal_gamma, cfg.label_smoothing, num_classes,
                                 cfg.focal_form)
    ordinal: nn.Module | None = None
    if cfg.ordinal_weight > 0:
        ordinal_cls = CoralLoss if head == "coral" else CumulativeOrdinalLoss
        ordinal = ordinal_cls(weights, num_classes)
    return GradingLoss(main, head, ordinal, cfg.ordinal_weight, cfg.aux_weight)


# --- the localizer ---------------------------------------------------------------------------


def focal_heatmap_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                       ) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over the supervised channels.

    Args:
        logits: (B, K, h, w).
        target: (B, K, h, w) Gaussians, 1 at each positive cell.
        mask: (B, K) 1 for supervised channels.
    """
    logits, target = logits.float(), target.float()
    m = mask[:, :, None, None]
    pos = (target >= 1.0).float() * m
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = -(pos * (1 - p) ** 2 * log_p).sum()
    neg_loss = -((1 - pos) * m * (1 - target) ** 4 * p**2 * log_q).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)
