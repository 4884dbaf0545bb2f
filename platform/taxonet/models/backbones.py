"""Backbone registry: torchvision CNNs with their classifier removed, plus a small CNN for CPU demos and tests.

Every backbone maps images [N, 3, H, W] to a feature vector R0 [N, feature_dim]. Pretrained weights come from the
caller as a state dict or an open file (this module reads no URIs); :func:`imagenet_weights` fetches torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch
import torchvision
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be loaded; the message says how to provide them."""


@dataclass(frozen=True)
class Backbone:
    name: str
    feature_dim: int
    build: Callable[[], nn.Module]
    #: torchvision weights enum attribute path, e.g. "ResNet50_Weights.IMAGENET1K_V2"; None if not torchvision
    torchvision_weights: str | None = None
    #: the torchvision builder name (its weights file names start with it)
    torchvision_name: str | None = None


BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


def _torchvision(name: str, feature_dim: int, weights: str) -> Backbone:
    def build() -> nn.Module:
        model = getattr(torchvision.models, name)(weights=None)
        # Drop the final classifier: the rank heads sit on the pooled feature R0.
        if hasattr(model, "fc"):
            model.fc = nn.Identity()
        elif hasattr(model, "classifier"):
            model.classifier = nn.Identity()
        return model

    return Backbone(name, feature_dim, build, torchvision_weights=weights, torchvision_name=name)


class SmallCNN(nn.Module):
    """Four conv blocks and global pooling (~0.3 M parameters): trains in seconds on a CPU at 32–64 px."""

    def __init__(self, width: int = 32, feature_dim: int = 256) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(3, width), block(width, width * 2), block(width * 2, width * 4), block(width * 4, feature_dim)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


for _name, _dim, _weights in (
    ("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnet34", 512, "ResNet34_Weights.IMAGENET1K_V1"),
    ("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V2"),
    ("efficientnet_b0", 1280, "EfficientNet_B0_Weights.IMAGENET1K_V1"),
    ("efficientnet_b3", 1536, "EfficientNet_B3_Weights.IMAGENET1K_V1"),
    ("mobilenet_v3_small", 576, "MobileNet_V3_Small_Weights.IMAGENET1K_V1"),
    ("mobilenet_v3_large", 960, "MobileNet_V3_Large_Weights.IMAGENET1K_V2"),
):
    register_backbone(_torchvision(_name, _dim, _weights))
register_backbone(Backbone("small_cnn", 256, SmallCNN))
register_backbone(Backbone("tiny_cnn", 64, lambda: SmallCNN(width=8, feature_dim=64)))


def imagenet_weights(name: str) -> dict[str, torch.Tensor]:
    """Backbone ``name``'s ImageNet weights through torchvision's weights API (downloaded once into
    ``$TORCH_HOME``); :class:`WeightsUnavailableError` says how to provide the file where there is no network."""
    backbone = _spec(name)
    if backbone.torchvision_weights is None:
        raise WeightsUnavailableError(f"backbone {name!r} has no ImageNet weights; use weights=null or a file")
    enum_name, member = backbone.torchvision_weights.split(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, HTTP errors, DNS failures ... all mean "not reachable from here"
        file_name = weights.url.rsplit("/", 1)[-1]
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone.name} could not be downloaded ({type(exc).__name__}: {exc}). "
            f"Provide them as a file instead: download {weights.url} on a machine with internet access and either "
            f"put it at $TORCH_HOME/hub/checkpoints/{file_name} (torchvision's cache), or set "
            f"model.weights=/path/to/{file_name} (or an s3:// URI) in the run config."
        ) from exc


def _spec(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}") from None


def build_backbone(name: str, weights: Mapping[str, torch.Tensor] | BinaryIO | None = None) -> tuple[nn.Module, int]:
    """Build backbone ``name``; returns (module, feature_dim). ``weights``: None (random init), a state dict, or an
    open file holding one (torchvision's ``.pth`` files, or ``{"state_dict": ...}``); the caller finds them
    (:func:`taxonet.train.loop.pretrained_weights` reads ``model.weights``)."""
    spec = _spec(name)
    module = spec.build()
    if weights is None:
        return module, spec.feature_dim
    state = weights
    if not isinstance(state, Mapping):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    # torchvision files carry the classifier we removed; drop those keys and insist the rest matches.
    own = module.state_dict()
    dropped = [k for k in state if k not in own and k.startswith(("fc.", "classifier."))]
    state = {k: v for k, v in state.items() if k not in dropped}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same keys, other shapes (e.g. a wider network's file)
        raise WeightsUnavailableError(f"the weights do not fit backbone {name!r}: {exc}") from exc
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"the weights do not fit backbone {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module, spec.feature_dim
