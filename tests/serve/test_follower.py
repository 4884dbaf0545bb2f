"""The model follower without Ray: waiting for a first version, following an alias, refusing damaged versions (also
on a follower started later), re-published checkpoints, storage errors and the fallback reference.

Registries on a local disk and on S3 over HTTP (moto's server); the models are real tiny checkpoints, loaded with
:func:`taxonet.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taxonet import registry, storage
from taxonet.checkpoint import LoadedCheckpoint, copy_checkpoint, load_checkpoint
from taxonet.registry import ResolvedModel
from taxonet.serve.follower import FAILED, LOADED, REFUSED, UNCHANGED, WAITING, ModelFollower
from tests.checkpoint_support import DAMAGES, damage_version, tiny_checkpoint

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("follow")
    return {"a": tiny_checkpoint(root / "a", version="run-a", seed=1),
            "b": tiny_checkpoint(root / "b", version="run-b", seed=2),
            "c": tiny_checkpoint(root / "c", version="run-c", seed=3)}


class Loader:
    """Loads for real and remembers which (uri, version) it was asked to load."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __call__(self, resolved: ResolvedModel) -> LoadedCheckpoint:
        self.loaded.append(resolved.version)
        return load_checkpoint(resolved.uri)


def live_version(follower: ModelFollower[LoadedCheckpoint]) -> str | None:
    return follower.current.resolved.version if follower.current else None


def test_waits_for_a_first_version_then_follows_the_alias(models: str, checkpoints: dict[str, Path]) -> None:
    load = Loader()
    follower = ModelFollower(f"{models}/demo@production", load)
    waiting = follower.poll()
    assert waiting.outcome == WAITING and not waiting.is_failure and follower.current is None
    assert "does not exist yet" in (follower.last_error or "")
    assert follower.status()["ready"] is False and follower.load_failures == 0

    registry.publish(checkpoints["a"], models, "demo")
    registry.publish(checkpoints["b"], models, "demo")
    registry.promote(models, "demo", 1, "production")
    first = follower.poll()
    assert first.outcome == LOADED and first.served is not None and first.served.resolved.version == "1"
    assert first.served.model.version == "1" and follower.last_error is None
    assert follower.poll().outcome == UNCHANGED and load.loaded == ["1"]  # polling alone loads nothing

    registry.promote(models, "demo", 2, "production")
    assert follower.poll().outcome == LOADED and live_version(follower) == "2"
    registry.rollback(models, "demo", "production")
    assert follower.poll().outcome == LOADED and live_version(follower) == "1"
    status = follower.status()
    assert status["ready"] is True and status["live"]["version"] == "1" and status["last_error"] is None
    assert load.loaded == ["1", "2", "1"] and follower.load_failures == 0


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_version_is_refused_the_old_stays_and_a_later_follower_refuses_it_too(
        models: str, checkpoints: dict[str, Path], damage: str) -> None:
    if damage == "dotdot key" and not storage.is_s3(models):
        pytest.skip("a key with a '..' segment exists only on object storage")
    registry.publish(checkpoints["a"], models, "demo")
    registry.publish(checkpoints["b"], models, "demo")
    registry.promote(models, "demo", 1, "production")
    load = Loader()
    follower = ModelFollower(f"{models}/demo@production", load)
    assert follower.poll().outcome == LOADED
    registry.promote(models, "demo", 2, "production")  # verified when promoted ...
    damage_version(registry.version_uri(models, "demo", 2), damage)  # ... damaged afterwards

    result = follower.poll()
    assert result.outcome == REFUSED and result.is_failure
    assert live_version(follower) == "1" and follower.load_failures == 1
    assert "still serving version 1" in (follower.last_error or "")
    status = follower.status()
    assert status["live"]["version"] == "1" and status["last_error"] == follower.last_error
    assert len(status["refused"]) == 1  # remembered: not verified or counted again while the alias stays there
    assert follower.poll().outcome == UNCHANGED and follower.load_failures == 1

    # A replica started after the failure refuses version 2 too and serves what the alias pointed at before, as
    # the replicas that were running do
    later = ModelFollower(f"{models}/demo@production", load)
    assert later.poll().outcome == LOADED and live_version(later) == "1"
    assert later.load_failures == 1 and registry.version_uri(models, "demo", 2) in (later.last_error or "")
    assert later.status()["model_reference"] == f"{models}/demo@production"
    assert later.poll().outcome == UNCHANGED and live_version(later) == "1" and later.load_failures == 1
    assert load.loaded == ["1", "1"], "a damaged version must never reach the loader"

    registry.rollback(models, "demo", "production")
    assert later.poll().outcome == UNCHANGED and live_version(later) == "1" and later.last_error is None


def test_a_later_follower_with_only_damaged_versions_serves_nothing(models: str,
                                                                    checkpoints: dict[str, Path]) -> None:
    registry.publish(checkpoints["a"], models, "demo")
    registry.promote(models, "demo", 1, "production")
    damage_version(registry.version_uri(models, "demo", 1), "bad hash")
    load = Loader()
    follower = ModelFollower(f"{models}/demo@production", load)
    assert follower.poll().outcome == REFUSED and follower.current is None and follower.load_failures == 1
    assert follower.poll().outcome == UNCHANGED and follower.load_failures == 1  # not tried, not counted again
    assert follower.current is None and load.loaded == [] and follower.status()["ready"] is False


def test_a_checkpoint_republished_in_place_is_reloaded(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    """A plain checkpoint URI is followed by its manifest's digest, not its URI string."""
    served = tmp_path / "served"
    copy_checkpoint(checkpoints["a"], served)
    follower = ModelFollower(str(served), Loader())
    assert follower.poll().outcome == LOADED and follower.current.model.version == "run-a"
    assert follower.poll().outcome == UNCHANGED
    copy_checkpoint(checkpoints["b"], served)  # same URI, new content
    assert follower.poll().outcome == LOADED and follower.current.model.version == "run-b"


def test_a_model_that_fails_to_load_is_refused(models: str, checkpoints: dict[str, Path]) -> None:
    registry.publish(checkpoints["a"], models, "demo")
    registry.promote(models, "demo", 1, "production")

    def broken(resolved: ResolvedModel) -> LoadedCheckpoint:
        raise RuntimeError("CUDA out of memory")

    follower = ModelFollower(f"{models}/demo@production", broken)
    assert follower.poll().outcome == REFUSED and "CUDA out of memory" in (follower.last_error or "")
    assert follower.current is None and follower.load_failures == 1


def test_an_unreadable_store_is_a_failure_retried_next_poll(s3_server: str) -> None:
    follower = ModelFollower("s3://no-such-bucket-taxonet/models/demo@production", Loader())
    for attempt in (1, 2):
        result = follower.poll()
        assert result.outcome == FAILED and follower.load_failures == attempt and follower.current is None
    assert "no-such-bucket-taxonet" in (follower.last_error or "")


def test_a_refused_reference_falls_back_while_nothing_is_loaded(tmp_path: Path,
                                                                checkpoints: dict[str, Path]) -> None:
    """A replica started with a rolled-out reference that is refused serves the application's own one."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    copy_checkpoint(checkpoints["a"], good)
    copy_checkpoint(checkpoints["b"], bad)
    (bad / "model.pt").write_bytes(b"truncated")
    follower = ModelFollower(str(bad), Loader(), fallback=str(good))
    result = follower.poll()
    assert result.outcome == LOADED and follower.current.model.version == "run-a"
    assert follower.reference == str(bad) and "does not match" in (follower.last_error or "")
    assert follower.poll().outcome == UNCHANGED  # the refused one is not retried; the fallback stays
    copy_checkpoint(checkpoints["c"], bad)  # re-published with a new manifest: followed again
    assert follower.poll().outcome == LOADED and follower.current.model.version == "run-c"
    assert follower.last_error is None


def test_a_malformed_reference_is_refused_at_once() -> None:
    with pytest.raises(Exception, match="gs://|not supported|scheme"):
        ModelFollower("gs://bucket/models/demo@production", Loader())
