"""The one place where ``ModelConfig`` becomes explicit constructor arguments."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from spinegrade.config import ConfigError, ModelConfig
from spinegrade.constants import NUM_CLASSES, NUM_LEVELS
from spinegrade.models.backbone import create_backbone, normalization_stats
from spinegrade.models.heads import coral_prior_logits, log_prior_logits, random_init_
from spinegrade.models.net import SpineGrader

_log = logging.getLogger(__name__)


def head_prior_bias(
    cfg: ModelConfig, num_classes: int = NUM_CLASSES, class_counts: Sequence[float] | None = None
) -> tuple[float, ...]:
    """Initial bias of the head's final layer, as ``model.bias_init`` asks.

    ``log_prior`` without ``class_counts`` (e.g. when building a model only to load a
    checkpoint into it) falls back to the fixed prior, and says so.
    """
    coral = cfg.head == "coral"
    n = num_classes - 1 if coral else num_classes
    if cfg.bias_init == "zero":
        return (0.0,) * n
    if cfg.bias_init == "log_prior":
        if class_counts is not None:
            if len(class_counts) != num_classes:
                raise ValueError(f"class_counts has {len(class_counts)} entries, expected {num_classes}")
            return coral_prior_logits(class_counts) if coral else log_prior_logits(class_counts)
        _log.info("model.bias_init=log_prior but no class counts given: using the fixed prior")
    return tuple(cfg.coral_prior_logits if coral else cfg.prior_logits)


def build_model(
    cfg: ModelConfig,
    n_slices: int = 7,
    num_classes: int = NUM_CLASSES,
    class_counts: Sequence[float] | None = None,
) -> SpineGrader:
    """Build the network a ``ModelConfig`` describes (v4..v8 are all configs of this).

    Args:
        cfg: The ``model`` section of the config.
        n_slices: Slices per crop stack (``data.n_slices``).
        num_classes: Severity classes.
        class_counts: Training label counts per class, for ``bias_init=log_prior``.
    """
    if (cfg.input_mode == "channels") != (cfg.aggregator == "none"):
        raise ConfigError("model.aggregator=none goes with model.input_mode=channels (2.5D stem), "
                          "and every other aggregator with input_mode=slices; "
                          f"got input_mode={cfg.input_mode}, aggregator={cfg.aggregator}")
    in_chans = n_slices if cfg.input_mode == "channels" else 3
    backbone, weights = create_backbone(
        cfg.backbone, pretrained=cfg.pretrained, pretrained_path=cfg.pretrained_path,
        in_chans=in_chans, drop_path_rate=cfg.drop_path_rate, stem_init=cfg.stem_init)
    mean, std = normalization_stats(backbone, in_chans)
    model = SpineGrader(
        backbone,
        mean=mean,
        std=std,
        n_slices=n_slices,
        input_mode=cfg.input_mode,
        slice_channel=cfg.slice_channel,
        aggregator=cfg.aggregator,
        aggregator_hidden=cfg.aggregator_hidden,
        aggregator_heads=cfg.aggregator_heads,
        centre_weight_init=cfg.centre_weight_init,
        level_conditioning=cfg.level_conditioning,
        level_embed_dim=cfg.level_embed_dim,
        head=cfg.head,
        prior_bias=head_prior_bias(cfg, num_classes, class_counts),
        head_hidden=cfg.head_hidden,
        dropout=cfg.dropout,
        aux_heads=cfg.aux_heads,
        num_classes=num_classes,
        num_levels=NUM_LEVELS,
        backbone_weights=weights,
    )
    if cfg.head_init == "random":
        random_init_(model.head)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
