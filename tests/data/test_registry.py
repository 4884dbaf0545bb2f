"""The model registry on a local disk and on S3 over HTTP (moto's server): publish, resolve, promote, rollback,
concurrent publishes, corrupt versions, taxonomy changes, and loads that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from taxonet import registry, storage
from taxonet.checkpoint import MANIFEST, load_checkpoint, verify_checkpoint
from taxonet.config import load_config
from taxonet.errors import CheckpointError, StorageError
from taxonet.registry import NotPublishedError, RegistryError
from tests.checkpoint_support import DAMAGES, damage_version, other_taxonomy, tiny_checkpoint

pytestmark = [pytest.mark.data, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {"a": tiny_checkpoint(root / "a", version="run-a", seed=1),
            "b": tiny_checkpoint(root / "b", version="run-b", seed=2, train_state=True),
            "new-taxonomy": tiny_checkpoint(root / "t", version="run-t", taxonomy=other_taxonomy())}


def _files(uri: str) -> dict[str, int]:
    return storage.list_relative(uri)


# ---------------------------------------------------------------------------------------------------- references
def test_parse_reference() -> None:
    ref = registry.parse_reference("s3://taxonet/models/resnet50_mtl@production")
    assert (ref.models, ref.name, ref.alias, ref.version) == ("s3://taxonet/models", "resnet50_mtl", "production",
                                                              None)
    pinned = registry.parse_reference("/srv/models/demo@12")
    assert (pinned.models, pinned.name, pinned.alias, pinned.version) == ("/srv/models", "demo", None, 12)
    plain = registry.parse_reference("s3://bucket/runs/x/best")
    assert plain.checkpoint == "s3://bucket/runs/x/best" and not plain.is_registry
    with pytest.raises(RegistryError, match="expected MODELS/NAME@ALIAS"):
        registry.parse_reference("s3://bucket/models/demo@pro duction")
    with pytest.raises(RegistryError, match="versions start at 1"):
        registry.parse_reference("s3://bucket/models/demo@0")
    with pytest.raises(StorageError, match="unsupported storage URI"):
        registry.parse_reference("gs://bucket/models/demo@production")
    assert registry.split_model("s3://bucket/models/demo/") == ("s3://bucket/models", "demo")
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.split_model("/srv/models/..")


# ---------------------------------------------------------------------------------------------------- lifecycle
def test_publish_promote_resolve_rollback(models: str, checkpoints: dict[str, Path]) -> None:
    with pytest.raises(NotPublishedError, match="does not exist yet"):
        registry.resolve(f"{models}/demo@production")
    assert registry.publish(checkpoints["a"], models, "demo") == 1
    assert registry.publish(checkpoints["b"], models, "demo") == 2
    v1, v2 = registry.version_uri(models, "demo", 1), registry.version_uri(models, "demo", 2)
    # only listed files travel; the version's manifest names the model, the number and the source
    assert "train_state.pt" in _files(v2) and MANIFEST in _files(v1)
    manifest = verify_checkpoint(v2)
    assert manifest["name"] == "demo" and manifest["version"] == "2"
    assert manifest["source"]["uri"] == str(checkpoints["b"]) and manifest["source"]["version"] == "run-b"
    assert storage.list_relative(storage.join(models, "demo", "staging")) == {}  # staging cleaned up

    registry.promote(models, "demo", 1, "production")
    record = registry.promote(models, "demo", 2, "production")
    assert record.version == 2 and [h["version"] for h in record.history] == [1]
    alias_file = json.loads(storage.read_bytes(registry.alias_uri(models, "demo", "production")))
    assert set(alias_file) == {"model", "alias", "version", "updated", "history"} and alias_file["version"] == 2
    resolved = registry.resolve(f"{models}/demo@production")
    assert (resolved.uri, resolved.version, resolved.name, resolved.alias) == (v2, "2", "demo", "production")
    loaded = load_checkpoint(resolved.uri, strict=True)
    assert loaded.name == "demo" and loaded.version == "2"
    assert registry.promote(models, "demo", 2, "production") == record  # promoting again changes nothing

    versions = registry.list_versions(models, "demo")
    assert [(v.number, v.aliases) for v in versions] == [(1, ()), (2, ("production",))]
    assert registry.list_models(models) == ["demo"]

    back = registry.rollback(models, "demo", "production")
    assert back.version == 1 and back.history == ()
    assert registry.resolve(f"{models}/demo@production").version == "1"
    with pytest.raises(RegistryError, match="no previous version"):
        registry.rollback(models, "demo", "production")
    with pytest.raises(NotPublishedError, match="no such alias"):
        registry.rollback(models, "demo", "staging")
    with pytest.raises(RegistryError, match="does not verify"):
        registry.promote(models, "demo", 3, "production")  # no such version
    assert registry.resolve(f"{models}/demo@2").fingerprint == resolved.fingerprint
    shown = registry.show(f"{models}/demo@production")
    assert shown["verified"] and shown["version"] == "1" and shown["taxonomy"]["species"] == 9
    assert shown["aliases"]["production"]["version"] == 1


def test_resolving_a_plain_checkpoint_sees_it_republished_in_place(models: str,
                                                                   checkpoints: dict[str, Path]) -> None:
    from taxonet.checkpoint import publish_checkpoint

    target = storage.join(models, "runs", "x", "best")
    publish_checkpoint(checkpoints["a"], target)
    first = registry.resolve(target)
    assert first.version == "run-a" and first.number is None and first.uri == target
    publish_checkpoint(checkpoints["b"], target)
    second = registry.resolve(target)
    assert second.version == "run-b" and second.fingerprint != first.fingerprint  # same URI, new content
    registry.verify(target)
    assert load_checkpoint(target).version == "run-b"


def test_versions_without_a_manifest_are_invisible_and_numbers_are_never_reused(
        models: str, checkpoints: dict[str, Path]) -> None:
    assert registry.publish(checkpoints["a"], models, "demo") == 1
    half = registry.version_uri(models, "demo", 2)
    storage.write_bytes(storage.join(half, "model.pt"), b"half an upload")  # a publish killed mid-copy
    assert [v.number for v in registry.list_versions(models, "demo")] == [1]
    with pytest.raises(NotPublishedError, match="not published"):
        registry.resolve(f"{models}/demo@2")
    with pytest.raises(RegistryError):
        registry.promote(models, "demo", 2, "production")
    assert registry.publish(checkpoints["b"], models, "demo") == 3
    assert [v.number for v in registry.list_versions(models, "demo")] == [1, 3]


def test_promotion_refuses_a_taxonomy_change_unless_allowed(models: str, checkpoints: dict[str, Path]) -> None:
    registry.publish(checkpoints["a"], models, "demo")
    registry.publish(checkpoints["new-taxonomy"], models, "demo")
    registry.promote(models, "demo", 1, "production")
    with pytest.raises(RegistryError, match=r"taxonomy differs .*rank species.*Novel species"):
        registry.promote(models, "demo", 2, "production")
    assert registry.read_alias(models, "demo", "production").version == 1
    assert registry.promote(models, "demo", 2, "staging").version == 2  # a new alias has no labels to keep
    assert registry.promote(models, "demo", 2, "production", allow_taxonomy_change=True).version == 2


# ---------------------------------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_corrupt_version_is_refused_and_the_alias_stays(models: str, checkpoints: dict[str, Path],
                                                          damage: str, tmp_path: Path) -> None:
    if damage == "dotdot key" and not storage.is_s3(models):
        pytest.skip("a key with a '..' segment exists only on object storage")
    registry.publish(checkpoints["a"], models, "demo")
    registry.publish(checkpoints["b"], models, "demo")
    registry.promote(models, "demo", 1, "production")
    v2 = registry.version_uri(models, "demo", 2)
    damage_version(v2, damage)
    with pytest.raises(RegistryError, match="does not verify"):
        registry.promote(models, "demo", 2, "production")
    with pytest.raises(CheckpointError):
        registry.verify(f"{models}/demo@2")
    with pytest.raises(CheckpointError):
        load_checkpoint(v2, strict=True)
    assert registry.show(f"{models}/demo@2")["verified"] is False
    assert registry.read_alias(models, "demo", "production").version == 1
    assert load_checkpoint(registry.resolve(f"{models}/demo@production").uri, strict=True).version == "1"
    assert not (tmp_path / "evil").exists()


# ---------------------------------------------------------------------------------------------------- concurrency
def test_concurrent_publishes_get_distinct_numbers(models: str, checkpoints: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Both publishers look for the next number before either claims one (a barrier holds the first claim of each
    until both arrive), so both try the same number: the exclusive create lets one win, the other takes the next."""
    registry.publish(checkpoints["a"], models, "demo")
    barrier = threading.Barrier(2, timeout=120)
    original = storage.create_new
    attempts: list[str] = []
    lock = threading.Lock()
    first_call = threading.local()

    def racing_create_new(uri: str, data: bytes) -> bool:
        if not getattr(first_call, "done", False):
            first_call.done = True
            barrier.wait()
        with lock:
            attempts.append(uri.rsplit("/", 1)[-1])
        return original(uri, data)

    monkeypatch.setattr(storage, "create_new", racing_create_new)
    numbers: list[int] = []
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            numbers.append(registry.publish(checkpoints[name], models, "demo"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors, errors
    assert sorted(numbers) == [2, 3]
    assert sorted(attempts) == ["000002.json", "000002.json", "000003.json"]  # they did collide on 2
    for number in (1, 2, 3):
        verify_checkpoint(registry.version_uri(models, "demo", number))
    sources = {json.loads(storage.read_bytes(storage.join(registry.version_uri(models, "demo", n), MANIFEST)))
               ["source"]["version"] for n in (2, 3)}
    assert sources == {"run-a", "run-b"}


PUBLISH_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    from taxonet import registry
    go, checkpoint, models, out = sys.argv[1:5]
    pathlib.Path(out + ".ready").write_text("ready")  # imported: waiting at the start line
    deadline = time.monotonic() + 120
    while not pathlib.Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    pathlib.Path(out).write_text(str(registry.publish(checkpoint, models, "demo")))
""")


def test_two_processes_publishing_at_once_get_distinct_numbers(models: str, checkpoints: dict[str, Path],
                                                               tmp_path: Path) -> None:
    script = tmp_path / "publish.py"
    script.write_text(PUBLISH_SCRIPT)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    processes = [subprocess.Popen([sys.executable, str(script), str(go), str(checkpoints[name]), models,
                                   str(tmp_path / f"out-{name}")], env=env) for name in ("a", "b")]
    # both import taxonet (seconds) and then wait at the start line; start them together
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not all((tmp_path / f"out-{n}.ready").exists() for n in ("a", "b")):
        assert all(p.poll() is None for p in processes), "a publisher exited before the start"
        time.sleep(0.05)
    go.write_text("go")
    for process in processes:
        assert process.wait(timeout=200) == 0
    numbers = sorted(int((tmp_path / f"out-{name}").read_text()) for name in ("a", "b"))
    assert numbers == [1, 2]
    assert [v.number for v in registry.list_versions(models, "demo")] == [1, 2]
    for number in numbers:
        verify_checkpoint(registry.version_uri(models, "demo", number))


# ---------------------------------------------------------------------------------------------------- loading
def test_loading_leaves_no_temporary_directory(models: str, checkpoints: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    registry.publish(checkpoints["b"], models, "demo")
    registry.promote(models, "demo", 1, "production")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # every tempfile.* default goes here now
    uri = registry.resolve(f"{models}/demo@production").uri
    for _ in range(3):
        loaded = load_checkpoint(uri, strict=True, load_train_state=True)
    assert loaded.train_state == {"epoch": 0, "seed": 2} and loaded.thresholds is not None
    from taxonet.checkpoint import local_checkpoint

    with local_checkpoint(uri) as directory:  # a download on S3, the directory itself locally
        assert (directory / "model.pt").exists() and directory.is_relative_to(scratch) == storage.is_s3(uri)
        verify_checkpoint(directory)
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- training hook
def test_publish_run_publishes_and_promotes_from_the_config(models: str, checkpoints: dict[str, Path],
                                                            tmp_path: Path) -> None:
    config = load_config("demo", [f"registry.uri={models}", "registry.promote=production"])
    registry.check_publish_target(config)
    published = registry.publish_run(str(checkpoints["a"]), config)
    assert published.version == 1 and published.name == config.name and published.alias.version == 1
    assert registry.resolve(f"{models}/{config.name}@production").version == "1"
    assert registry.publish_run(str(checkpoints["a"]), load_config("demo")) is None  # registry.uri empty
    named = load_config("demo", [f"registry.uri={models}", "registry.name=bees"])
    assert registry.publish_run(str(checkpoints["b"]), named).reference == f"{storage.join(models, 'bees')}@1"
    changed = registry.publish_run  # a promotion refused after publishing says the version exists
    with pytest.raises(RegistryError, match="published .* version 2, but did not promote it"):
        changed(str(checkpoints["new-taxonomy"]), config)
    assert [v.number for v in registry.list_versions(models, config.name)] == [1, 2]
    assert registry.resolve(f"{models}/{config.name}@production").version == "1"
    assert published.to_dict() == {
        "model": storage.join(models, config.name), "name": config.name, "version": 1,
        "reference": f"{storage.join(models, config.name)}@1", "alias": "production",
        "alias_reference": f"{storage.join(models, config.name)}@production", "reused": False}
    # the same files again (a retried job, a rerun of a finished run): version 1 is reused, and promoted again
    again = registry.publish_run(str(checkpoints["a"]), config)
    assert (again.version, again.reused, again.alias.version) == (1, True, 1)
    assert registry.read_alias(models, config.name, "production").version == 1
    # ... unless that version no longer verifies: then the checkpoint is published anew
    damaged = storage.join(registry.version_uri(models, "bees", 1), "metrics.json")
    storage.write_bytes(damaged, storage.read_bytes(damaged) + b" ")
    fresh = registry.publish_run(str(checkpoints["b"]), named)
    assert (fresh.version, fresh.reused) == (2, False)
    assert [v.number for v in registry.list_versions(models, config.name)] == [1, 2]
    # a checkpoint that does not verify is not published; the message says how to retry by hand
    half = tmp_path / "half"
    half.mkdir()
    with pytest.raises(RegistryError, match=r"could not publish .*half as a new version of .*not a complete "
                                            r"taxonet checkpoint.*nothing was published; retry with `taxonet "
                                            r"models publish .*half .* --alias production`"):
        registry.publish_run(str(half), config)
    assert [v.number for v in registry.list_versions(models, config.name)] == [1, 2]


def test_registry_config_is_validated() -> None:
    from taxonet.config import ConfigError

    with pytest.raises(ConfigError, match="needs registry.uri"):
        load_config("demo", ["registry.promote=production"])
    with pytest.raises(ConfigError, match="not a valid alias"):
        load_config("demo", ["registry.uri=/tmp/m", "registry.promote=12"])
    with pytest.raises(ConfigError, match="not a valid model name"):
        load_config("demo", ["registry.uri=/tmp/m", "registry.name=a/b"])
    with pytest.raises(StorageError, match="unsupported storage URI"):
        registry.check_publish_target(load_config("demo", ["registry.uri=gs://bucket/models"]))
