"""Models: a registry of backbones and the multitask rank heads of Bjerge et al. 2023.

``build_model(config.model, taxonomy)`` returns a :class:`HierarchicalClassifier` whose ``forward`` gives
``{rank: logits}`` (one entry per rank, or only the last rank for a single-task baseline).
"""

from taxonet.models.backbones import (BACKBONES, Backbone, WeightsUnavailableError, build_backbone, imagenet_weights,
                                      register_backbone)
from taxonet.models.heads import FEATURES_KEY, HierarchicalClassifier, RankHead, WithFeatures, build_model

__all__ = [
    "BACKBONES",
    "Backbone",
    "FEATURES_KEY",
    "HierarchicalClassifier",
    "RankHead",
    "WeightsUnavailableError",
    "WithFeatures",
    "build_backbone",
    "build_model",
    "imagenet_weights",
    "register_backbone",
]
