"""SpineGrader: backbone over a crop's slices -> slice aggregator -> level conditioning -> head.

Shapes: ``x`` (B, S, 3, H, W) float in [0, 1]; ``level`` (B,) int64 in 0..4.

- ``input_mode="slices"`` (v4-v6, v8): the shared 2D backbone sees each of the B*S slices as
  an RGB image (the 3 channels are the 3 intensity windows), giving (B, S, F).
- ``input_mode="channels"`` (v7, 2.5D): each slice is reduced to one channel (``"first"``
  window or the ``"mean"`` of the 3), and the S slices become the S channels of one image
  for a backbone with an S-channel stem, giving (B, F) directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from spinegrade.constants import NUM_CLASSES, NUM_LEVELS
from spinegrade.models.aggregators import SliceAggregator, create_aggregator
from spinegrade.models.backbone import BackboneWeights, Normalize, backbone_feature_dim
from spinegrade.models.conditioning import LevelEmbedding, LevelFiLM
from spinegrade.models.heads import HEAD_CLASSES


class SpineGrader(nn.Module):
    """Grades one condition at one disc level from a stack of crops around it.

    Args:
        backbone: A timm model created with ``num_classes=0`` (pooled features out).
        mean: Per-input-channel normalisation mean (from the backbone's pretrained config).
        std: Per-input-channel normalisation std.
        n_slices: S, slices per crop stack; the centre slice is ``S // 2``.
        input_mode: "slices" (shared 2D backbone per slice) or "channels" (2.5D stem).
        slice_channel: In "channels" mode, which window becomes the slice's channel:
            "first" or "mean" of the three.
        aggregator: ``model.aggregator`` name; must be "none" in "channels" mode.
        aggregator_hidden: Hidden size of recurrent / attention aggregators.
        aggregator_heads: Self-attention heads of the v4 aggregator.
        centre_weight_init: Initial centre logit of the softmax slice weights.
        level_conditioning: "embedding" (concatenate), "film" (modulate the backbone
            features), or "none".
        level_embed_dim: Size of the level embedding.
        head: "softmax" (``num_classes`` logits) or "coral" (``num_classes - 1`` logits).
        prior_bias: Initial bias of the head's final layer.
        head_hidden: Optional hidden layer in the head (0: none).
        dropout: Dropout before the head's linear layers.
        aux_heads: Add v4's auxiliary heads: ``aux_level`` (B, num_levels) predicts the level
            from the level-free backbone features; ``aux_slice`` (B, S) predicts which slice is
            the labelled one, from each slice's own backbone features.
        num_classes: Severity classes.
        num_levels: Disc levels.
        backbone_weights: Where the backbone's weights came from (recorded, not used).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        n_slices: int,
        input_mode: str = "slices",
        slice_channel: str = "mean",
        aggregator: str = "softmax_weights",
        aggregator_hidden: int = 256,
        aggregator_heads: int = 4,
        centre_weight_init: float = 1.0,
        level_conditioning: str = "embedding",
        level_embed_dim: int = 256,
        head: str = "softmax",
        prior_bias: Sequence[float] = (),
        head_hidden: int = 0,
        dropout: float = 0.0,
        aux_heads: bool = False,
        num_classes: int = NUM_CLASSES,
        num_levels: int = NUM_LEVELS,
        backbone_weights: BackboneWeights | None = None,
    ) -> None:
        super().__init__()
        if input_mode == "channels" and aggregator != "none":
            raise ValueError("input_mode='channels' has one feature vector per crop; "
                             "use aggregator='none'")
        if input_mode == "slices" and aggregator == "none":
            raise ValueError("input_mode='slices' needs an aggregator over the slices")
        self.n_slices, self.num_classes, self.input_mode = n_slices, num_classes, input_mode
        self.slice_channel, self.head_type = slice_channel, head
        self.backbone_weights = backbone_weights
        self.num_features = backbone_feature_dim(backbone)
        self._backbone_trainable = True

        self.normalize = Normalize(tuple(mean), tuple(std))
        self.backbone = backbone
        self.film = LevelFiLM(num_levels, self.num_features) if level_conditioning == "film" else None
        self.aggregator = create_aggregator(
            aggregator, num_features=self.num_features, n_slices=n_slices,
            hidden=aggregator_hidden, num_heads=aggregator_heads,
            centre_weight_init=centre_weight_init)
        pooled = self.aggregator.out_features
        self.embed = (LevelEmbedding(num_levels, level_embed_dim)
                      if level_conditioning == "embedding" else None)
        head_in = self.embed.out_features(pooled) if self.embed is not None else pooled
        head_cls = HEAD_CLASSES[head]
        self.head = head_cls(head_in, num_classes, prior_bias, hidden=head_hidden, dropout=dropout)
        self.aux_level = nn.Linear(self.num_features, num_levels) if aux_heads else None
        self.aux_slice = (nn.Linear(self.num_features, 1)
                          if aux_heads and input_mode == "slices" else None)

    # --- forward -------------------------------------------------------------------------
    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, 3, H, W) -> normalised backbone input, (B*S, 3, H, W) or (B, S, H, W)."""
        if not x.is_floating_point():
            raise TypeError(f"SpineGrader expects float images in [0, 1], got {x.dtype}")
        if self.input_mode == "slices":
            imgs = x.flatten(0, 1)
        else:
            imgs = x[:, :, 0] if self.slice_channel == "first" else x.mean(dim=2)
        imgs = self.normalize(imgs)
        if self._stem_channels_last():
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return imgs

    def _stem_channels_last(self) -> bool:
        # After model.to(memory_format=channels_last) the 4-D conv weights are channels_last;
        # the 5-D input cannot be, so match the layout here.
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        return False

    def forward_features(self, x: torch.Tensor, level: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone, level conditioning and aggregation.

        Returns:
            ``features`` (B, head input size) and, where the variant has them,
            ``slice_attention`` (B, S), ``aux_level`` (B, num_levels), ``aux_slice`` (B, S).
        """
        b = x.shape[0]
        feats = self.backbone(self._images(x))
        if self.input_mode == "slices":
            feats = feats.view(b, self.n_slices, -1)
        out: dict[str, torch.Tensor] = {}
        if self.aux_level is not None:
            out["aux_level"] = self.aux_level(feats.mean(1) if feats.dim() == 3 else feats)
        if self.aux_slice is not None:
            out["aux_slice"] = self.aux_slice(feats).squeeze(-1)
        if self.film is not None:
            feats = self.film(feats, level)
        pooled, attention = self.aggregator(feats)
        if attention is not None:
            out["slice_attention"] = attention
        out["features"] = self.embed(pooled, level) if self.embed is not None else pooled
        return out

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Head logits: (B, num_classes) softmax or (B, num_classes - 1) CORAL."""
        return self.head(features)

    def forward(self, x: torch.Tensor, level: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``logits`` plus the optional outputs of :meth:`forward_features`."""
        out = self.forward_features(x, level)
        out["logits"] = self.forward_head(out.pop("features"))
        return out

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) valid class distribution, for either head type."""
        return self.head.probabilities(logits)

    # --- training helpers ----------------------------------------------------------------
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the timm backbone (the low-learning-rate group)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the backbone: aggregator, conditioning, heads."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in backbone)

    def set_backbone_trainable(self, flag: bool) -> None:
        """Freeze or unfreeze the backbone; a frozen backbone also keeps BN/dropout in eval."""
        self._backbone_trainable = flag
        for p in self.backbone.parameters():
            p.requires_grad_(flag)
        self.train(self.training)

    @property
    def backbone_trainable(self) -> bool:
        """Whether the backbone is being trained."""
        return self._backbone_trainable

    def train(self, mode: bool = True) -> SpineGrader:
        super().train(mode)
        if mode and not self._backbone_trainable:
            self.backbone.eval()  # frozen BN statistics must not drift
        return self

    def reset_head_bias(self) -> None:
        """Set the head's final bias back to the configured prior (dead-class recovery)."""
        self.head.reset_bias()

    def slice_weights(self) -> torch.Tensor | None:
        """(S,) learned slice-position weights of the v8 aggregator; None for other ones."""
        if isinstance(self.aggregator, SliceAggregator):
            return self.aggregator.slice_weights().detach()
        return None

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the backbone, where timm supports it."""
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)
