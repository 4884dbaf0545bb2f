"""Start Debian's Prometheus on 127.0.0.1 with a static scrape target, and query it (used by the metrics tests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_prometheus(target: str, root: Path, timeout: float = 60.0) -> Iterator[str]:
    """Prometheus scraping ``target`` (host:port) every second; yields its base URL. Skips if not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed (Debian: apt-get install prometheus)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: ['{target}']\n")
    url = f"http://127.0.0.1:{_free_port()}"
    with (root / "prometheus.log").open("w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address={url.removeprefix('http://')}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"prometheus exited with {process.returncode}: "
                                         f"{(root / 'prometheus.log').read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("prometheus did not become ready")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def query(prometheus: str, promql: str) -> dict[str, float]:
    """Instant PromQL query → {label set text: value}."""
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1])
            for r in body["data"]["result"]}


def wait_for_value(prometheus: str, promql: str, expected: float, timeout: float = 60) -> None:
    """Poll until the query answers exactly one series with value ``expected`` (metrics lag 1–15 s)."""
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        last = query(prometheus, promql)
        if list(last.values()) == [expected]:
            return
        time.sleep(1.0)
    raise AssertionError(f"{promql} did not reach {expected} in {timeout:.0f} s; last answer {last}")
