"""Backbone weights named by ``model.weights`` as an s3:// URI (moto's server over HTTP): the training side reads
them through taxonet.storage and hands the state dict to the model builder, which reads no URIs itself."""

from __future__ import annotations

import io

import pytest
import torch

from taxonet import storage
from taxonet.config import ModelConfig
from taxonet.models import WeightsUnavailableError, build_backbone
from taxonet.train.loop import pretrained_weights

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_backbone_weights_from_s3(s3_bucket: str) -> None:
    torch.manual_seed(1)
    source, _ = build_backbone("tiny_cnn")
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    uri = f"s3://{s3_bucket}/weights/tiny.pt"
    storage.write_bytes(uri, buffer.getvalue())
    torch.manual_seed(2)
    loaded, _ = build_backbone("tiny_cnn", pretrained_weights(ModelConfig(backbone="tiny_cnn", weights=uri)))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(WeightsUnavailableError, match="not found"):
        pretrained_weights(ModelConfig(backbone="tiny_cnn", weights=f"s3://{s3_bucket}/weights/missing.pt"))
