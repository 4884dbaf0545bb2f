"""Checkpoints on a local disk: the manifest lists what the writer produced, readers read only listed files and check
their hashes, copies never remove the old target first, resume compatibility names what differs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from taxonet import checkpoint as ckpt
from taxonet import storage
from taxonet.checkpoint import (
    MANIFEST,
    add_thresholds,
    check_compatible,
    copy_checkpoint,
    load_checkpoint,
    read_manifest,
    require_compatible,
    verify_checkpoint,
    write_manifest,
)
from taxonet.config import load_config
from taxonet.errors import CheckpointError
from taxonet.taxonomy import Taxonomy
from tests.checkpoint_support import other_taxonomy, tiny_checkpoint

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "ckpt", train_state=True)


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def test_manifest_lists_exactly_what_the_writer_wrote(checkpoint: Path) -> None:
    files = set(_manifest(checkpoint)["files"])
    assert files == {"model.pt", "model.json", "taxonomy.json", "config.json", "transform.json", "metrics.json",
                     "thresholds.json", "thresholds.csv", "train_state.pt"}
    (checkpoint / "notes.txt").write_text("left here by someone")
    write_manifest(checkpoint)  # not told which files: the known checkpoint files only, never a stray one
    assert "notes.txt" not in _manifest(checkpoint)["files"]
    write_manifest(checkpoint, files=["model.pt", "model.json", "taxonomy.json", "config.json", "transform.json",
                                      "metrics.json"])
    assert "thresholds.json" not in _manifest(checkpoint)["files"]
    with pytest.raises(CheckpointError, match="no such file"):
        write_manifest(checkpoint, files=["model.pt", "absent.bin"])
    with pytest.raises(CheckpointError, match="unsafe path"):
        write_manifest(checkpoint, files=["../outside.bin"])


def test_unlisted_thresholds_and_train_state_are_never_loaded(checkpoint: Path) -> None:
    loaded = load_checkpoint(checkpoint, load_train_state=True)
    assert loaded.thresholds is not None and loaded.train_state == {"epoch": 0, "seed": 0}
    # new weights published without thresholds: the stale thresholds.json and train_state.pt stay on disk
    listed = [n for n in _manifest(checkpoint)["files"] if n not in ("thresholds.json", "thresholds.csv",
                                                                      "train_state.pt")]
    write_manifest(checkpoint, files=listed)
    loaded = load_checkpoint(checkpoint, load_train_state=True)
    assert loaded.thresholds is None and loaded.train_state is None
    # ... and a full verification refuses the directory for holding files its manifest does not list
    with pytest.raises(CheckpointError, match="not listed"):
        verify_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="not listed"):
        load_checkpoint(checkpoint, strict=True)
    assert verify_checkpoint(checkpoint, allow_extra_files=True)["files"].keys() == set(listed)


@pytest.mark.parametrize("damage", ["bad hash", "truncated", "missing file", "no manifest", "corrupt manifest",
                                    "escaping name", "unlisted required file"])
def test_damaged_checkpoints_are_refused_with_the_reason(checkpoint: Path, damage: str) -> None:
    manifest = _manifest(checkpoint)
    if damage == "bad hash":
        data = bytearray((checkpoint / "model.pt").read_bytes())
        data[-10] ^= 0xFF  # same size, other content
        (checkpoint / "model.pt").write_bytes(bytes(data))
        reason = "does not match its sha256"
    elif damage == "truncated":
        (checkpoint / "model.pt").write_bytes((checkpoint / "model.pt").read_bytes()[:-100])
        reason = "bytes"
    elif damage == "missing file":
        (checkpoint / "taxonomy.json").unlink()
        reason = "taxonomy.json listed in checkpoint.json is missing"
    elif damage == "no manifest":
        (checkpoint / MANIFEST).unlink()
        reason = "not a complete taxonet checkpoint"
    elif damage == "corrupt manifest":
        (checkpoint / MANIFEST).write_text("{ not json")
        reason = "is corrupt"
    elif damage == "escaping name":
        manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
        (checkpoint / MANIFEST).write_text(json.dumps(manifest))
        reason = "unsafe path"
    else:
        del manifest["files"]["model.pt"]
        (checkpoint / MANIFEST).write_text(json.dumps(manifest))
        reason = "does not list"
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(checkpoint)


def test_add_thresholds_lists_them_and_keeps_the_rest(tmp_path: Path) -> None:
    from taxonet.anomaly import AnomalyThresholds, ClassThreshold

    directory = tiny_checkpoint(tmp_path / "c", thresholds=False, version="v7")
    assert "thresholds.json" not in _manifest(directory)["files"]
    rows = [ClassThreshold("order", 0, Taxonomy.demo().names[0][0], 5.0, 1.0, 3.0, 4)]
    add_thresholds(directory, AnomalyThresholds(rows, k=2.0), {"fitted_on": "train"})
    manifest = read_manifest(directory)
    assert {"thresholds.json", "thresholds.csv"} <= set(manifest["files"]) and manifest["version"] == "v7"
    loaded = load_checkpoint(directory)
    assert loaded.thresholds is not None and loaded.metrics["fitted_on"] == "train"


def test_copy_checkpoint_keeps_the_old_target_until_the_new_one_is_complete(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    old = tiny_checkpoint(tmp_path / "old", version="old", seed=1)
    new = tiny_checkpoint(tmp_path / "new", version="new", seed=2)
    target = tmp_path / "served" / "best"
    copy_checkpoint(old, target)
    assert read_manifest(target)["version"] == "old"

    calls = {"n": 0}
    original = storage.copy_file

    def fail_on_third(source: str, destination: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        original(source, destination)

    monkeypatch.setattr(storage, "copy_file", fail_on_third)
    with pytest.raises(OSError, match="injected"):
        copy_checkpoint(new, target)
    assert read_manifest(target)["version"] == "old"  # untouched and still whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["best"]  # no partial directory left
    monkeypatch.setattr(storage, "copy_file", original)

    (new / "stray.bin").write_bytes(b"not part of the checkpoint")
    copy_checkpoint(new, target)
    assert read_manifest(target)["version"] == "new"
    assert not (target / "stray.bin").exists()  # only listed files travel
    assert sorted(p.name for p in target.parent.iterdir()) == ["best"]
    verify_checkpoint(target)


def test_publish_checkpoint_to_a_local_target_replaces_it_whole(tmp_path: Path) -> None:
    first = tiny_checkpoint(tmp_path / "a", version="a", train_state=True)
    second = tiny_checkpoint(tmp_path / "b", version="b")
    ckpt.publish_checkpoint(first, str(tmp_path / "pub"))
    ckpt.publish_checkpoint(second, "file://" + str(tmp_path / "pub"))
    assert read_manifest(tmp_path / "pub")["version"] == "b"
    assert not (tmp_path / "pub" / "train_state.pt").exists()  # the old checkpoint's extra file went with it
    verify_checkpoint(tmp_path / "pub")


def test_loading_writes_nothing_to_disk(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for _ in range(3):
        load_checkpoint(checkpoint, strict=True)
    assert list(scratch.iterdir()) == []


def test_check_compatible_names_what_differs(checkpoint: Path) -> None:
    config = load_config("demo", ["model.backbone=tiny_cnn", "model.weights=null", "data.input_size=32"])
    demo = Taxonomy.demo()
    assert check_compatible(checkpoint, config, demo) == []
    assert check_compatible(load_checkpoint(checkpoint), config.with_overrides(["model.weights=imagenet"]),
                            demo) == []  # how a fresh run would initialise does not matter to a resume
    differences = check_compatible(checkpoint, config.with_overrides(["model.backbone=small_cnn",
                                                                      "model.hidden=64"]), other_taxonomy())
    assert any("rank species" in d and "Novel species" in d for d in differences)
    assert "model.backbone: checkpoint 'tiny_cnn', run 'small_cnn'" in differences
    assert any(d.startswith("model.hidden") for d in differences)
    reordered = Taxonomy(demo.ranks, (demo.names[0][::-1], *demo.names[1:]),
                         (demo.parents[0], *[tuple(len(demo.names[0]) - 1 - p for p in demo.parents[1])],
                          *demo.parents[2:]))
    assert any("another order" in d for d in check_compatible(checkpoint, config, reordered))
    with pytest.raises(CheckpointError, match="cannot resume from .*Novel species"):
        require_compatible(checkpoint, config, other_taxonomy())


def test_unsupported_scheme_is_a_clear_error_not_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("gs://bucket/run/best", "abfs://container/best", "http://example.org/best"):
        with pytest.raises(Exception, match="unsupported storage URI") as caught:
            load_checkpoint(uri)
        assert isinstance(caught.value, storage.StorageError)
    assert os.listdir(tmp_path) == []


def test_materialize_and_local_checkpoint_of_a_local_directory(checkpoint: Path, tmp_path: Path) -> None:
    assert ckpt.materialize(str(checkpoint)) == checkpoint
    with ckpt.local_checkpoint("file://" + str(checkpoint)) as directory:
        assert directory == checkpoint
    assert checkpoint.exists()  # a local checkpoint is never removed by the context manager
    shutil.rmtree(checkpoint)
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.materialize(str(checkpoint))
