"""Helpers for checkpoint and registry tests: a real (untrained, tiny) checkpoint written in well under a second."""

from __future__ import annotations

from pathlib import Path

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
