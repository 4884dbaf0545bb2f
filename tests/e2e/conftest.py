"""End-to-end fixtures: a standalone moto S3 server process and a `ray start --head` cluster, all on 127.0.0.1.

These tests run in their own pytest process (``make test`` runs tests/e2e last): a driver that already joined the
in-process Ray of the other tests cannot join a second cluster. The cluster is ended by the mark its processes
carry, never with `ray stop` (which ends every Ray on the machine, other sessions' included).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, free_port
from tests.net_support import end_processes, marked_processes, process_tree

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def wait_for(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as exc:  # connection refused until the server is up; HTTP errors mean it is up
            if hasattr(exc, "code"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not come up in {timeout:.0f} s") from exc
            time.sleep(0.5)


@pytest.fixture(scope="session")
def e2e_env() -> Iterator[dict[str, str]]:
    """moto_server (the PyPI standalone binary) as a separate process; yields the environment for clients."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "wb")
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                               stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(endpoint + "/")
        env = dict(os.environ)
        env.update({
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": S3_REGION,
            "AWS_DEFAULT_REGION": S3_REGION, "AWS_ENDPOINT_URL_S3": endpoint,
            "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        })
        env.pop("RAY_ADDRESS", None)
        os.environ.update({k: env[k] for k in env if k.startswith(("AWS_", "RAY_"))})
        yield env
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


MARK_ENV = "TAXONET_E2E_RAY_MARK"


@dataclass
class RayHead:
    address: str  # GCS address for ray.init / serve
    dashboard: str  # http URL for `ray job submit`
    metrics_port: int


@pytest.fixture(scope="session")
def ray_head(e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """`ray start --head` on 127.0.0.1 with known ports (started from the venv so jobs use its Python)."""
    ray = str(BIN / "ray")
    # Every process of this cluster inherits the mark: the teardown ends exactly those. `ray stop` would end every
    # Ray on the machine, other sessions' included (a developer's, another test run's).
    mark = uuid.uuid4().hex
    head_env = {**e2e_env, MARK_ENV: mark}
    gcs, dashboard, metrics = free_port(), free_port(), free_port()
    command = [ray, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
               "--metrics-export-port", str(metrics), "--disable-usage-stats"]
    started = subprocess.run(command, env=head_env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    head = RayHead(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dashboard}", metrics_port=metrics)
    try:
        wait_for(head.dashboard + "/api/version", timeout=90)
        yield head
    finally:
        try:
            import ray as ray_module

            ray_module.shutdown()
        except Exception:
            pass
        # the marked processes and their children, taken before any ends (an orphan loses its parent link)
        left = end_processes(process_tree(marked_processes(MARK_ENV, mark)))
        assert not left, f"processes of the e2e Ray cluster outlived SIGKILL: {left}"
        current = Path("/tmp/ray/ray_current_cluster")
        with contextlib.suppress(OSError):
            if current.read_text().strip() == head.address:  # ours: a later `ray.init()` must not look for it
                current.unlink()
