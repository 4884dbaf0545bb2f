"""Models: {rank: logits} per backbone, single-task baselines, the registry and weight loading (file / ImageNet)."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from taxonet.config import ModelConfig
from taxonet.models import (BACKBONES, HierarchicalClassifier, WeightsUnavailableError, build_backbone, build_model,
                            imagenet_weights)
from taxonet.train.loop import pretrained_weights
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def demo() -> Taxonomy:
    return Taxonomy.demo()


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_multitask_model_gives_one_logit_tensor_per_rank(demo: Taxonomy, backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, weights=None, hidden=32), demo).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert list(out) == ["order", "family", "species"]
    assert {rank: tuple(t.shape) for rank, t in out.items()} == {"order": (2, 4), "family": (2, 5), "species": (2, 9)}
    assert all(torch.isfinite(t).all() for t in out.values())


def test_heads_follow_the_paper(demo: Taxonomy) -> None:
    model = build_model(ModelConfig(backbone="tiny_cnn", weights=None, dropout=0.5, hidden=512), demo)
    assert isinstance(model, HierarchicalClassifier)
    assert model.dropout.p == 0.5
    for rank in demo.ranks:
        head = model.heads[rank]
        assert (head.fc1.in_features, head.fc1.out_features) == (BACKBONES["tiny_cnn"].feature_dim, 512)
        assert head.fc2.out_features == demo.num_classes(rank)


def test_single_task_baseline_has_only_the_last_rank(demo: Taxonomy) -> None:
    model = build_model(ModelConfig(backbone="tiny_cnn", weights=None, hidden=16, single_task=True), demo).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert list(out) == ["species"]
    assert tuple(out["species"].shape) == (3, 9)


def test_unknown_backbone_is_named_with_the_alternatives(demo: Taxonomy) -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'; available: .*resnet50"):
        build_model(ModelConfig(backbone="resnet9000", weights=None), demo)


def test_backbone_weights_file_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    source, _ = build_backbone("tiny_cnn")
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)  # a different random init, so equality below means "loaded from the file"
    loaded, dim = build_backbone("tiny_cnn", pretrained_weights(ModelConfig(backbone="tiny_cnn", weights=str(path))))
    assert dim == BACKBONES["tiny_cnn"].feature_dim
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a checkpoint wrapping the weights as {"state_dict": ...} works too, and so does a state dict in memory
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict()}, wrapped)
    with wrapped.open("rb") as handle:
        again, _ = build_backbone("tiny_cnn", handle)
    assert torch.equal(again.state_dict()["features.0.0.weight"], source.state_dict()["features.0.0.weight"])
    in_memory, _ = build_backbone("tiny_cnn", source.state_dict())
    assert torch.equal(in_memory.state_dict()["features.0.0.weight"], source.state_dict()["features.0.0.weight"])
    # the config's "no weights" spellings mean a random init
    for none in (None, "", "none", "random"):
        assert pretrained_weights(ModelConfig(backbone="tiny_cnn", weights=none)) is None


def test_weights_that_do_not_fit_or_do_not_exist(tmp_path) -> None:
    other, _ = build_backbone("small_cnn")
    with pytest.raises(WeightsUnavailableError, match="do not fit backbone 'tiny_cnn'"):
        build_backbone("tiny_cnn", other.state_dict())
    with pytest.raises(WeightsUnavailableError, match="not found"):
        pretrained_weights(ModelConfig(backbone="tiny_cnn", weights=str(tmp_path / "missing.pt")))
    with pytest.raises(WeightsUnavailableError, match="has no ImageNet weights"):
        imagenet_weights("tiny_cnn")
    with pytest.raises(WeightsUnavailableError, match="has no ImageNet weights"):
        pretrained_weights(ModelConfig(backbone="tiny_cnn", weights="imagenet"))


def test_imagenet_weights_offline_say_how_to_provide_the_file(tmp_path, monkeypatch) -> None:
    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    # an empty torch cache, and the download fails as it does on this offline machine
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError) as excinfo:
        imagenet_weights("resnet18")
    message = str(excinfo.value)
    assert "ImageNet weights for resnet18 could not be downloaded" in message
    assert "https://download.pytorch.org/models/resnet18" in message  # what to fetch
    assert "hub/checkpoints/resnet18" in message  # where torchvision's cache expects it
    assert "model.weights=" in message  # or how to point the config at it
