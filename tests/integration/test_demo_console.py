"""`taxonet demo`'s console (issue 15): a shortened demo (few images, 2 epochs, no serving wait) through the real CLI
— Ray Train, evaluate, Ray Serve — prints taxonet's own lines only: stage headers, one progress line per epoch with
an ETA, the final unseen-species table, at most 80 lines above that summary; Ray's internal lines land in the log
file whose path it prints. Starts Ray: run under the lock."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
#: Ray's own lines that flooded the demo's console before (issue 15)
RAY_NOISE = ("TrainingReport", "SplitCoordinator", "Execution plan", "RayTrainWorker pid", "TrainController",
             "Started a local Ray instance", "replica", "core_worker")


def test_demo_console_is_taxonets_own(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    log = tmp_path / "ray-lines.log"
    result = subprocess.run(
        [sys.executable, "-m", "taxonet.cli", "demo", "--out", str(tmp_path / "demo"), "--per-species", "12",
         "--epochs", "2", "--no-serve", "--port", str(free_port()), "--log-file", str(log)],
        capture_output=True, text=True, timeout=840, env=env, cwd=tmp_path)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-5000:]
    lines = result.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("Unseen species:"))
    assert summary <= 80, "\n".join(lines[:summary])
    assert len(result.stderr.splitlines()) <= 5, result.stderr
    assert str(log) in lines[0]
    for noise in RAY_NOISE:
        assert noise not in console, noise
    epochs = [line for line in lines if re.search(r"taxonet train: epoch \d/2 .*ETA \d+:\d\d", line)]
    assert len(epochs) == 2, console
    assert sum(bool(re.match(r"\[\d/6\] ", line)) for line in lines) == 6
    # the final table: one row per unseen species (one per family of the demo tree) and the overall row
    table = lines[summary + 1:]
    assert table[0].startswith("unseen species") and "correct higher rank" in table[0]
    assert sum(" sp. novum " in line for line in table) == 4 and any(line.startswith("all ") for line in table)
    text = log.read_text(encoding="utf-8")
    assert "TrainingReport" in text and "taxonet train: epoch 2/2" in text
