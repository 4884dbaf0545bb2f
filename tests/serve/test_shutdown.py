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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.checkpoint_support import tiny_checkpoint

from .helpers import encode, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")]

MARK_ENV = "TAXONET_TEST_SERVE_MARK"
CLIENTS = 8


def marked_processes(mark: str) -> dict[int, str]:
    """Live processes whose environment carries ``MARK_ENV=mark``: pid → command line (Ray's process title)."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue  # a zombie is dead: it only waits for its parent to read its status
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Load:
    """``clients`` threads POSTing one JPEG each in a loop; records every status (or the exception's name)."""

    def __init__(self, url: str, body: bytes, clients: int) -> None:
        self.results: list[int | str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url, body), daemon=True) for _ in range(clients)]

    def _run(self, url: str, body: bytes) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    status: int | str = client.post(url, content=body,
                                                     headers={"content-type": "image/jpeg"}).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                    time.sleep(0.1)
                self.results.append(status)

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


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
        for pid in marked_processes(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(900)
def test_sigterm_after_a_replica_crash_under_load_ends_the_whole_ray_session(
        served: tuple[subprocess.Popen[str], list[str], int, str], insect_images: list) -> None:
    process, output, port, mark = served
    url = f"http://127.0.0.1:{port}/v1/classify"
    with Load(url, encode(insect_images[0][1]), CLIENTS) as load:
        wait_for(lambda: load.results.count(200) >= 2 * CLIENTS, timeout=180, what="answers under load")
        replicas = {pid: line for pid, line in marked_processes(mark).items() if "TaxonetClassifier" in line}
        assert len(replicas) == 1, marked_processes(mark)
        (replica,) = replicas
        os.kill(replica, signal.SIGKILL)
        answered = len(load.results)
        # the crash is noticed while requests keep coming: the ingress answers 503 or Serve replaces the replica
        wait_for(lambda: len(load.results) >= answered + 2 * CLIENTS and replica not in marked_processes(mark),
                 timeout=180, what="requests after the replica was killed")
        assert len(marked_processes(mark)) > 3  # gcs_server, raylet, Serve's actors...: the session to be ended
        process.send_signal(signal.SIGTERM)
        # the command bounds its own shutdown (--shutdown-timeout, 20 s); the rest is a loaded machine's slack
        assert process.wait(timeout=120) == 0, "".join(output)
    wait_for(lambda: not port_open(port), timeout=60, what=f"port {port} to close")
    wait_for(lambda: not marked_processes(mark), timeout=60, what="the Ray session's processes to end")
    assert "taxonet: stopped" in "".join(output), "".join(output)
    # the service survived the crash: answers, and no 5xx beyond "unavailable" and "timed out" (docs/api.md)
    statuses = set(load.results)
    assert 200 in statuses and not {s for s in statuses if isinstance(s, int) and s >= 500} - {503, 504}, statuses
