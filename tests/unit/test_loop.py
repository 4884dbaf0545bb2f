"""The training loop without Ray: epochs, the paper's best-epoch rule, checkpoints through the reporter, resuming,
and completing the best epoch into the checkpoint serving loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from taxonet.checkpoint import load_checkpoint
from taxonet.config import RunConfig, load_config
from taxonet.devices import resolve_device
from taxonet.taxonomy import Taxonomy
from taxonet.train.loop import BEST, EpochCheckpoint, Metrics, TrainState, complete_checkpoint, fit
from tests.support import TensorData

pytestmark = pytest.mark.unit


def _config(epochs: int) -> RunConfig:
    return load_config("demo", {"data.input_size": 16, "model.backbone": "tiny_cnn", "optim.epochs": epochs,
                                "optim.lr": 3e-3, "train.seed": 0})


def _data(taxonomy: Taxonomy) -> TensorData:
    torch.manual_seed(0)
    targets = torch.tensor([list(taxonomy.encode(row)) for row in taxonomy.rows()] * 4)
    images = torch.randn(len(targets), 3, 16, 16) + targets[:, 2:3, None, None].float() / 4  # learnable a bit
    return TensorData(images, targets, images[:18], targets[:18], batch_size=8, val_batch_size=8)


class LastAndBest:
    """A reporter that keeps every epoch's checkpoint as ``last`` and the best one as ``best``."""

    def __init__(self, root: Path) -> None:
        self.root, self.seen = root, []

    def __call__(self, metrics: Metrics, checkpoint: EpochCheckpoint) -> None:
        self.seen.append(dict(metrics))
        checkpoint.write(self.root / "last")
        if metrics[BEST]:
            checkpoint.write(self.root / "best")


@pytest.mark.timeout(300)
def test_epochs_best_rule_resume_and_completed_checkpoint(tmp_path: Path) -> None:
    taxonomy = Taxonomy.demo()
    data = _data(taxonomy)
    device = resolve_device("cpu")
    reporter = LastAndBest(tmp_path)
    history = fit(_config(2), taxonomy, data, reporter, device=device)

    assert [h["epoch"] for h in history] == [0, 1] and [h["start_epoch"] for h in history] == [0, 0]
    assert reporter.seen[0][BEST]  # the first epoch always improves on "no epoch yet"
    for i, entry in enumerate(history):  # is_best: lower validation loss than every epoch before it
        assert entry[BEST] == (entry["val_loss"] < min([h["val_loss"] for h in history[:i]], default=float("inf")))
        assert entry["best_val_loss"] == min(h["val_loss"] for h in history[:i + 1])
    assert all(isinstance(v, (int, float, bool)) for h in history for v in h.values())

    # a rerun resumes from the last epoch's checkpoint: only the new epoch runs, the history goes on
    state = TrainState.load(tmp_path / "last")
    assert state.epoch == 1 and state.history == history
    resumed = LastAndBest(tmp_path / "again")
    longer = fit(_config(3), taxonomy, data, resumed, device=device, resume=state)
    assert [h["epoch"] for h in longer] == [0, 1, 2] and longer[:2] == history
    assert [m["epoch"] for m in resumed.seen] == [2] and resumed.seen[0]["start_epoch"] == 2

    # the best epoch becomes the served checkpoint: thresholds, the history, no resume state; the source stays
    thresholds = complete_checkpoint(tmp_path / "best", tmp_path / "served", data.unshuffled_train(), device=device,
                                     history=longer)
    served = load_checkpoint(tmp_path / "served")
    source = load_checkpoint(tmp_path / "best")
    assert served.thresholds is not None and len(served.thresholds.rows) == len(thresholds.rows) > 0
    assert served.metrics["history"] == longer
    assert "train_state.pt" not in served.manifest["files"] and "train_state.pt" in source.manifest["files"]
    assert (served.name, served.version) == (source.name, source.version)
    for key, value in source.model.state_dict().items():
        assert torch.equal(served.model.state_dict()[key], value), key
    assert json.loads((tmp_path / "served" / "metrics.json").read_text())["epoch"] == source.metrics["epoch"]


@pytest.mark.timeout(120)
def test_an_epoch_without_validation_batches_is_judged_by_its_training_loss(tmp_path: Path) -> None:
    taxonomy = Taxonomy.demo()
    data = _data(taxonomy)
    empty = TensorData(data.train_images, data.train_targets, data.val_images[:0], data.val_targets[:0],
                       batch_size=8)
    history = fit(_config(1), taxonomy, empty, lambda metrics, checkpoint: None, device=resolve_device("cpu"))
    assert history[0]["val_images"] == 0 and history[0]["val_loss"] == history[0]["train_loss"]
