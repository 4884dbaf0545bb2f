"""The hostile-load benchmark must keep working: its --smoke mode (1 MP images, 4 clients, a few seconds) starts
``taxonet serve`` on an embedded Ray, drives the whole mix and prints its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_hostile.py"


@pytest.mark.timeout(900)
def test_hostile_benchmark_smoke_measures_memory_and_every_kind_of_request() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")}
    for role in ("ingress", "classifier"):
        assert int(rows[role][0]) >= 1 and float(rows[role][2].replace(",", "")) > 0, rows  # a peak RSS measured
    for kind in ("png16", "jpeg", "maxfiles", "slow"):
        assert int(rows[kind][0]) >= 1, rows  # every kind of request was sent and answered
    assert "200" in rows["png16"][1], rows  # a 1 MP image is classified
    assert "STOPPED" not in result.stdout, result.stdout[-3000:]
    assert "final 5xx answers (faults: any 5xx but a 503 with Retry-After): 0;" in result.stdout, result.stdout[-3000:]
