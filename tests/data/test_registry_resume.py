"""What training and evaluation load is verified, on a local disk and on S3 over HTTP (moto's server): a resume reads
an epoch checkpoint only when its manifest exists and every hash matches, and refuses one whose taxonomy or model
architecture is not the run's, saying what differs; evaluation refuses a checkpoint that does not verify; none of
these loads leaves a temporary directory behind."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from taxonet import storage
from taxonet.checkpoint import MANIFEST, publish_checkpoint, read_manifest
from taxonet.config import RunConfig, load_config
from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset
from taxonet.errors import CheckpointError
from taxonet.evaluate.run import run_evaluation
from taxonet.taxonomy import Taxonomy
from taxonet.train.loop import EpochCheckpoint, build_training, check_resumable, resume_state
from tests.checkpoint_support import other_taxonomy

pytestmark = [pytest.mark.data, pytest.mark.timeout(300)]


def _config(**overrides: object) -> RunConfig:
    return load_config("demo", {"data.input_size": 16, "model.backbone": "tiny_cnn", "model.weights": None,
                                "optim.epochs": 2, **overrides})


@pytest.fixture(scope="module")
def epoch_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An epoch checkpoint as the Ray Train worker writes one (weights, resume state, manifest last)."""
    config, taxonomy = _config(), Taxonomy.demo()
    model, _, optimizer = build_training(config, taxonomy, torch.device("cpu"))
    metrics = {"epoch": 0, "val_loss": 1.5, "is_best": True}
    directory = tmp_path_factory.mktemp("epoch") / "checkpoint_000000"
    return EpochCheckpoint(model, optimizer, taxonomy, config, metrics, 1.5, [metrics]).write(directory)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the checkpoints of a test live: a local directory, or a prefix in a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs"


def _copy(source: Path, root: str, name: str) -> str:
    uri = storage.join(root, name)
    publish_checkpoint(source, uri)
    return uri


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every tempfile.* default goes to an empty directory the test checks afterwards."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_a_resume_reads_a_verified_checkpoint_and_leaves_nothing_behind(epoch_checkpoint: Path, root: str,
                                                                        scratch: Path) -> None:
    uri = _copy(epoch_checkpoint, root, "run/checkpoint_000000")
    for _ in range(3):
        state = resume_state(uri, _config(), Taxonomy.demo())
        check_resumable(uri, _config(), Taxonomy.demo())
    assert state.epoch == 0 and state.best_loss == 1.5 and state.history[0]["val_loss"] == 1.5
    assert set(state.model) and state.optimizer["param_groups"]
    assert list(scratch.iterdir()) == []  # read into memory: no download directory, also from S3


@pytest.mark.parametrize("damage, message", [
    ("no-manifest", "not a complete taxonet checkpoint"),
    ("train-state-flipped", "train_state.pt does not match its sha256"),
    ("model-truncated", "model.pt does not match .*bytes"),
    ("model-missing", "model.pt listed in checkpoint.json is missing"),
])
def test_a_resume_refuses_a_half_written_or_damaged_checkpoint(epoch_checkpoint: Path, root: str, tmp_path: Path,
                                                               damage: str, message: str) -> None:
    local = tmp_path / "damaged"
    shutil.copytree(epoch_checkpoint, local)
    if damage == "no-manifest":  # what a writer killed before its last step leaves
        (local / MANIFEST).unlink()
    elif damage == "train-state-flipped":
        data = bytearray((local / "train_state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (local / "train_state.pt").write_bytes(bytes(data))
    elif damage == "model-truncated":
        (local / "model.pt").write_bytes((local / "model.pt").read_bytes()[:-10])
    else:
        (local / "model.pt").unlink()
    uri = storage.join(root, "damaged")
    for path in sorted(p for p in local.iterdir()):  # copied as it is: no verification on the way
        storage.copy_file(str(path), storage.join(uri, path.name))
    with pytest.raises(CheckpointError, match=message):
        resume_state(uri, _config(), Taxonomy.demo())
    with pytest.raises(CheckpointError, match=message):
        check_resumable(uri, _config(), Taxonomy.demo())


def test_a_resume_with_another_taxonomy_or_model_is_refused_saying_what_differs(epoch_checkpoint: Path,
                                                                               root: str) -> None:
    uri = _copy(epoch_checkpoint, root, "run/checkpoint_000000")
    with pytest.raises(CheckpointError, match=r"cannot resume from .*taxonomy rank species: classes differ: 1 only "
                                              r"in the run \(Novel species\)"):
        resume_state(uri, _config(), other_taxonomy())
    with pytest.raises(CheckpointError, match=r"model.hidden: checkpoint \d+, run 7"):
        check_resumable(uri, _config(**{"model.hidden": 7}), Taxonomy.demo())
    with pytest.raises(CheckpointError, match=r"model.backbone: checkpoint 'tiny_cnn', run 'small_cnn'.*"
                                              r"model.dropout: checkpoint 0\.\d+, run 0\.01"):
        resume_state(uri, _config(**{"model.backbone": "small_cnn", "model.dropout": 0.01}), Taxonomy.demo())
    # what does not shape the model may change on a resume (more epochs, another learning rate)
    resume_state(uri, _config(**{"optim.epochs": 5, "optim.lr": 1e-2}), Taxonomy.demo())


@pytest.mark.timeout(600)
def test_evaluate_refuses_a_checkpoint_that_does_not_verify(epoch_checkpoint: Path, root: str, tmp_path: Path,
                                                            scratch: Path) -> None:
    dataset = str(tmp_path / "ds")
    write_synthetic_dataset(dataset, Taxonomy.demo(), per_species=3, image_size=16, seed=0,
                            options=PrepareOptions(workers=0, progress=False))
    uri = _copy(epoch_checkpoint, root, "best")
    report = run_evaluation(uri, dataset, split="train", device="cpu")  # the intact checkpoint evaluates
    assert report.checkpoint == uri
    # train_state.pt is not read by evaluation, but a tampered file means a tampered checkpoint: refused
    local = tmp_path / "tampered"
    shutil.copytree(epoch_checkpoint, local)
    data = bytearray((local / "train_state.pt").read_bytes())
    data[-1] ^= 0xFF
    (local / "train_state.pt").write_bytes(bytes(data))
    tampered = storage.join(root, "tampered")
    for path in sorted(local.iterdir()):
        storage.copy_file(str(path), storage.join(tampered, path.name))
    with pytest.raises(CheckpointError, match="train_state.pt does not match its sha256"):
        run_evaluation(tampered, dataset, split="train", device="cpu")
    # a file the manifest does not list (a stale thresholds.json beside new weights) is refused too
    stale = _copy(epoch_checkpoint, root, "stale")
    storage.write_bytes(storage.join(stale, "thresholds.json"), b'{"rows": []}')
    assert "thresholds.json" not in read_manifest(stale)["files"]
    with pytest.raises(CheckpointError, match=r"files not listed in checkpoint.json: \['thresholds.json'\]"):
        run_evaluation(stale, dataset, split="train", device="cpu")
    assert list(scratch.iterdir()) == []
