"""``taxonet serve`` on its own embedded Ray: a SIGTERM ends the command and every process of its Ray session, also
after a model replica crashed under load.

The command runs with a mark in its environment that every process it starts inherits (gcs_server, raylet, the
dashboard, Serve's controller, proxy and replicas, whose command lines Ray rewrites), so the test finds them all
through /proc without trusting the product's own bookkeeping.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.checkpoint_support import tiny_checkpoint
from tests.net_support import RequestLoop, free_port, marked_processes

from .helpers import encode, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")]

MARK_ENV = "TAXONET_TEST_SERVE_MARK"
CLIENTS = 8


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def load(url: str, body: bytes, clients: int) -> RequestLoop[int | str]:
    """``clients`` threads POSTing one JPEG each in a loop; records every status (or the exception's name)."""
    def send(client: httpx.Client, _: int) -> int:
        return client.post(url, content=body, headers={"content-type": "image/jpeg"}).status_code

    return RequestLoop(url, send, clients, on_error=lambda exc: type(exc).__name__, error_pause_s=0.1)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], int, str]]:
    """``taxonet serve`` on an embedded Ray with 2 CPUs, serving; yields (process, output lines, port, mark).

    Whatever the test leaves behind (a failing run) is killed afterwards, by the mark.
    """
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", version="shutdown")
    port, mark = free_port(), uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1", MARK_ENV: mark}
    env.pop("RAY_ADDRESS", None)  # its own embedded Ray, never the test session's
    command = [sys.executable, "-m", "taxonet.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
               "--num-cpus", "2", "--device", "cpu", "--max-replicas", "1", "--ingress-cpus", "0.5",
               "--classifier-cpus", "0.5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True).start()
    try:
        wait_for(lambda: any("Ctrl-C to stop" in line for line in output) or process.poll() is not None,
                 timeout=300, what="taxonet serve to report it is serving")
        assert process.poll() is None, "".join(output)
        yield process, output, port, mark
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in marked_processes(MARK_ENV, mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(900)
def test_sigterm_after_a_replica_crash_under_load_ends_the_whole_ray_session(
        served: tuple[subprocess.Popen[str], list[str], int, str], insect_images: list) -> None:
    process, output, port, mark = served
    url = f"http://127.0.0.1:{port}/v1/classify"
    with load(url, encode(insect_images[0][1]), CLIENTS) as running:
        wait_for(lambda: running.results.count(200) >= 2 * CLIENTS, timeout=180, what="answers under load")
        replicas = {pid: line for pid, line in marked_processes(MARK_ENV, mark).items() if "TaxonetClassifier" in line}
        assert len(replicas) == 1, marked_processes(MARK_ENV, mark)
        (replica,) = replicas
        os.kill(replica, signal.SIGKILL)
        answered = len(running.results)
        # the crash is noticed while requests keep coming: the ingress answers 503 or Serve replaces the replica
        wait_for(lambda: len(running.results) >= answered + 2 * CLIENTS and replica not in marked_processes(MARK_ENV, mark),
                 timeout=180, what="requests after the replica was killed")
        assert len(marked_processes(MARK_ENV, mark)) > 3  # gcs_server, raylet, Serve's actors...: the session to be ended
        process.send_signal(signal.SIGTERM)
        # the command bounds its own shutdown (--shutdown-timeout, 20 s); the rest is a loaded machine's slack
        assert process.wait(timeout=120) == 0, "".join(output)
    wait_for(lambda: not port_open(port), timeout=60, what=f"port {port} to close")
    wait_for(lambda: not marked_processes(MARK_ENV, mark), timeout=60, what="the Ray session's processes to end")
    assert "taxonet: stopped" in "".join(output), "".join(output)
    # the service survived the crash: answers, and no 5xx beyond "unavailable" and "timed out" (docs/api.md)
    statuses = set(running.results)
    assert 200 in statuses and not {s for s in statuses if isinstance(s, int) and s >= 500} - {503, 504}, statuses
