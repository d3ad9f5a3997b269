"""spinegrade.models: backbone factory, slice aggregators, level conditioning, heads, SpineGrader.

No training code lives here; ``build_model`` (factory.py) is the only reader of the config.
"""

from spinegrade.models.backbone import BackboneWeights, create_backbone, load_backbone_weights
from spinegrade.models.factory import build_model, head_prior_bias
from spinegrade.models.heads import coral_to_probs
from spinegrade.models.net import SpineGrader

__all__ = [
    "BackboneWeights",
    "SpineGrader",
    "build_model",
    "coral_to_probs",
    "create_backbone",
    "head_prior_bias",
    "load_backbone_weights",
]
