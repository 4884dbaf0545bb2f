"""A publish killed at any step (SIGKILL, as an OOM kill or a lost node) leaves the previous alias target readable
and no half version visible — on a local disk and on S3 over HTTP (moto's server).

The publisher runs what a finished training run runs (:func:`taxonet.registry.publish_run` with
``registry.promote=production``): every write of the publish, then the alias write of the promotion.

The pause is injected from the test side: the publishing subprocess wraps :mod:`taxonet.storage`'s writing functions
so that its k-th write announces itself and sleeps; the test then kills it there. Product code has no hook for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from taxonet import registry, storage
from taxonet.checkpoint import load_checkpoint, verify_checkpoint
from tests.checkpoint_support import tiny_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
#: processes alive at once (each imports torch: ~0.3 GB and a few CPU seconds)
BATCH = 4

SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    from taxonet import registry, storage
    from taxonet.config import load_config
    marker, pause_at, checkpoint, models = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    calls = []

    def pausing(name, original):
        def wrapper(*args, **kwargs):
            calls.append(name)
            if len(calls) == pause_at:  # announce the step about to run, then wait to be killed
                pathlib.Path(marker).write_text(f"{len(calls)} {name} {args[0] if args else ''}")
                time.sleep(3600)
            return original(*args, **kwargs)
        return wrapper

    for name in ("copy_file", "write_bytes", "create_new", "delete_tree", "delete_files"):
        setattr(storage, name, pausing(name, getattr(storage, name)))
    config = load_config("demo", [f"registry.uri={models}", "registry.name=demo", "registry.promote=production"])
    published = registry.publish_run(checkpoint, config)
    pathlib.Path(marker).write_text(f"done {published.version} {len(calls)}")
""")


def _start(script: Path, marker: Path, pause_at: int, checkpoint: Path, models: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    return subprocess.Popen([sys.executable, str(script), str(marker), str(pause_at), str(checkpoint), models],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(marker: Path, process: subprocess.Popen, timeout: float = 240.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text():
            return marker.read_text()
        if process.poll() is not None:
            raise AssertionError(f"publisher exited {process.returncode} before the pause: "
                                 f"{process.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no pause reached within {timeout} s")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_publish_killed_at_any_step_leaves_the_old_alias_and_no_half_version(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base = str(tmp_path / "models") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    old = tiny_checkpoint(tmp_path / "old", version="old", thresholds=False, seed=1)
    new = tiny_checkpoint(tmp_path / "new", version="new", thresholds=False, seed=2)
    script = tmp_path / "publish.py"
    script.write_text(SCRIPT)

    def registry_with_production(index: int) -> str:
        models = storage.join(base, f"r{index}")
        assert registry.publish(old, models, "demo") == 1
        registry.promote(models, "demo", 1, "production")
        return models

    # an uninterrupted run counts the steps (and shows the wrapper changes nothing)
    marker = tmp_path / "marker-0"
    process = _start(script, marker, 0, new, registry_with_production(0))
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    _, number, steps = marker.read_text().split()
    assert number == "2" and int(steps) >= 5
    assert registry.read_alias(storage.join(base, "r0"), "demo", "production").version == 2  # promoted

    outcomes: dict[int, str] = {}
    for first in range(1, int(steps) + 1, BATCH):
        batch = range(first, min(first + BATCH, int(steps) + 1))
        running = {k: _start(script, tmp_path / f"marker-{k}", k, new, registry_with_production(k)) for k in batch}
        for k, process in running.items():
            outcomes[k] = _wait_for(tmp_path / f"marker-{k}", process)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)

    visible_after: list[int] = []
    for k, step in sorted(outcomes.items()):
        models = storage.join(base, f"r{k}")
        # the alias still points at version 1, which loads and verifies completely
        resolved = registry.resolve(f"{models}/demo@production")
        assert resolved.version == "1", (k, step)
        assert load_checkpoint(resolved.uri, strict=True).manifest["source"]["version"] == "old"
        # every visible version is complete; version 2 is visible only once its manifest was written
        versions = [v.number for v in registry.list_versions(models, "demo")]
        assert versions in ([1], [1, 2]), (k, step, versions)
        for number in versions:
            verify_checkpoint(registry.version_uri(models, "demo", number))
        if versions == [1, 2]:
            visible_after.append(k)
        # and the registry carries on: the next publish gets a fresh, complete version
        again = registry.publish(new, models, "demo")
        assert again == (2 if "create_new" not in _steps_before(outcomes, k) else 3), (k, step, again)
        verify_checkpoint(registry.version_uri(models, "demo", again))
        assert registry.promote(models, "demo", again, "production").version == again
    # killed before its last two steps (removing the staging copy, then the alias write of the promotion), the
    # version is already complete and visible; the alias moves only with its own (last) write
    assert visible_after == [int(steps) - 1, int(steps)], outcomes
    assert outcomes[int(steps) - 1].split()[1] == "delete_tree", outcomes
    last = outcomes[int(steps)].split()
    assert last[1] == "write_bytes" and last[2].endswith("/aliases/production.json"), outcomes


def _steps_before(outcomes: dict[int, str], k: int) -> set[str]:
    """The storage functions that ran before the pause at step ``k`` (each step announced its function name)."""
    return {outcomes[j].split()[1] for j in range(1, k)}
