"""``model.init_from``: fine-tuning starts from a checkpoint's (or a registry version's) weights when it fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taxonet import registry
from taxonet.config import load_config
from taxonet.errors import CheckpointError
from taxonet.taxonomy import Taxonomy
from taxonet.train.loop import build_training
from tests.checkpoint_support import other_taxonomy, tiny_checkpoint


def config_from(reference: str | None, backbone: str = "tiny_cnn"):
    return load_config("demo", {"model.backbone": backbone, "model.weights": None, "data.input_size": 32,
                                "model.init_from": reference})


def test_init_from_a_checkpoint_or_a_registry_version_loads_its_weights(tmp_path: Path) -> None:
    source = tiny_checkpoint(tmp_path / "ckpt", seed=7)
    models = str(tmp_path / "models")
    number = registry.publish(source, models, "insects")
    registry.promote(models, "insects", number, "production")
    fresh, _, _ = build_training(config_from(None), Taxonomy.demo(), torch.device("cpu"))
    for reference in (str(source), f"{models}/insects@production", f"{models}/insects@{number}"):
        model, _, _ = build_training(config_from(reference), Taxonomy.demo(), torch.device("cpu"))
        expected = torch.load(source / "model.pt", weights_only=True)
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), (reference, name)
    assert any(not torch.equal(value, expected[name]) for name, value in fresh.state_dict().items())


def test_a_taxonomy_or_architecture_change_is_refused_with_the_differences(tmp_path: Path) -> None:
    source = tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="fine-tune from .*classes differ.*Novel species"):
        build_training(config_from(str(source)), other_taxonomy(), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="model.backbone"):
        build_training(config_from(str(source), backbone="small_cnn"), Taxonomy.demo(), torch.device("cpu"))
    with pytest.raises(CheckpointError):
        build_training(config_from(str(tmp_path / "missing")), Taxonomy.demo(), torch.device("cpu"))
