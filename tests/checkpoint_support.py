"""Helpers for checkpoint and registry tests: a real (untrained, tiny) checkpoint written in well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import boto3

from taxonet import storage
from taxonet.checkpoint import MANIFEST
from taxonet.taxonomy import Taxonomy


def tiny_checkpoint(directory: Path, *, taxonomy: Taxonomy | None = None, backbone: str = "tiny_cnn",
                    version: str | None = None, seed: int = 0, thresholds: bool = True,
                    train_state: bool = False) -> Path:
    """A complete checkpoint of a randomly initialised tiny CNN on ``taxonomy`` (default: the demo taxonomy), with
    anomaly thresholds (every class: μ = 1, σ = 0.5) unless ``thresholds`` is false."""
    import torch

    from taxonet.anomaly import AnomalyThresholds, ClassThreshold
    from taxonet.checkpoint import save_checkpoint
    from taxonet.config import load_config
    from taxonet.data.transforms import TransformSpec
    from taxonet.models import build_model

    taxonomy = taxonomy or Taxonomy.demo()
    config = load_config("demo", [f"model.backbone={backbone}", "model.weights=null", "data.input_size=32"])
    torch.manual_seed(seed)
    rows = [ClassThreshold(rank, i, name, 1.0, 0.5, 0.0, 10)
            for rank in taxonomy.ranks for i, name in enumerate(taxonomy.names[taxonomy.level(rank)])]
    return save_checkpoint(directory, build_model(config.model, taxonomy), taxonomy, config,
                           TransformSpec.from_config(config.data),
                           thresholds=AnomalyThresholds(rows, k=2.0) if thresholds else None,
                           metrics={"val_loss": 1.0 + seed, "epoch": 0},
                           train_state={"epoch": 0, "seed": seed} if train_state else None, version=version)


def other_taxonomy() -> Taxonomy:
    """The demo taxonomy with one more species: a taxonomy change."""
    demo = Taxonomy.demo()
    order, family, _ = demo.rows()[0]
    rows = demo.rows() + [[order, family, "Novel species"]]
    return Taxonomy.from_rows(rows, ranks=demo.ranks)


#: ways a published version goes bad after the fact (bit rot, tampering, a half-finished copy); "dotdot key" needs S3
DAMAGES = ("bad hash", "missing file", "unlisted extra file", "escaping manifest entry", "dotdot key")


def damage_version(version: str, damage: str) -> None:
    """Damage the checkpoint at URI ``version`` in one of the ways of :data:`DAMAGES`."""
    manifest = json.loads(storage.read_bytes(storage.join(version, MANIFEST)))
    if damage == "bad hash":
        data = bytearray(storage.read_bytes(storage.join(version, "model.pt")))
        data[-10] ^= 0xFF
        storage.write_bytes(storage.join(version, "model.pt"), bytes(data))
    elif damage == "missing file":
        storage.delete_files([storage.join(version, "thresholds.json")])
    elif damage == "unlisted extra file":
        storage.write_bytes(storage.join(version, "thresholds-old.json"), b"{}")
    elif damage == "escaping manifest entry":
        manifest["files"]["../../aliases/production.json"] = {"sha256": "0" * 64, "bytes": 10}
        storage.write_bytes(storage.join(version, MANIFEST), json.dumps(manifest).encode())
    elif damage == "dotdot key":
        bucket, key = storage.split_s3(version)
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{key}/../../../evil/.bashrc", Body=b"x")
    else:
        raise AssertionError(damage)
