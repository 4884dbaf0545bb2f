"""Rank heads and the hierarchical classifier (Bjerge et al. 2023, METHOD.md "Model").

R0 = backbone(x); dropout 0.5 on R0; for each rank l: R_l = W_l2 · relu(W_l1 · R0 + b_l1) + b_l2 (hidden 512).

:class:`WithFeatures` is the same model returning R0 too, from the same forward pass: what serving runs when it needs
the model's own embedding of each image (the review queue's look-alike groups).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import BinaryIO

import torch
from torch import nn

from taxonet.config import ModelConfig
from taxonet.models.backbones import build_backbone
from taxonet.taxonomy import Taxonomy


class RankHead(nn.Module):
    """Two-layer head for one rank: Linear → ReLU → Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features)))


class HierarchicalClassifier(nn.Module):
    """Shared backbone + one independent head per rank; ``forward`` returns ``{rank: logits}``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, heads: dict[str, int], hidden: int = 512,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.ranks = tuple(heads)
        self.heads = nn.ModuleDict({rank: RankHead(feature_dim, n, hidden) for rank, n in heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classify(self.backbone(images))

    def classify(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads on pooled backbone features R0 [N, feature_dim]: ``{rank: logits}``."""
        features = self.dropout(features)
        return {rank: self.heads[rank](features) for rank in self.ranks}


#: the key under which :class:`WithFeatures` adds R0 to the heads' logits (a name no rank can collide with unnoticed)
FEATURES_KEY = "_features"


class WithFeatures(nn.Module):
    """A :class:`HierarchicalClassifier` whose ``forward`` returns ``{rank: logits, FEATURES_KEY: R0}``: the pooled
    backbone features the heads see, from the same pass (no second forward). Shares the classifier's parameters."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        if FEATURES_KEY in model.ranks:
            raise ValueError(f"a rank may not be named {FEATURES_KEY!r}: serving uses that key for the features")
        self.model = model
        self.ranks = model.ranks
        self.feature_dim = model.feature_dim

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.model.backbone(images)
        return {**self.model.classify(features), FEATURES_KEY: features}


def build_model(config: ModelConfig, taxonomy: Taxonomy,
                backbone_weights: Mapping[str, torch.Tensor] | BinaryIO | None = None) -> HierarchicalClassifier:
    """Model for ``taxonomy``: every rank (multitask) or the last rank only (``config.single_task``); the backbone
    starts from ``backbone_weights`` (see :func:`~taxonet.models.backbones.build_backbone`), else at random."""
    backbone, dim = build_backbone(config.backbone, backbone_weights)
    ranks = taxonomy.ranks[-1:] if config.single_task else taxonomy.ranks
    heads = {rank: taxonomy.num_classes(rank) for rank in ranks}
    return HierarchicalClassifier(backbone, dim, heads, hidden=config.hidden, dropout=config.dropout)
