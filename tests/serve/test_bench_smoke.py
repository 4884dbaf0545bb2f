"""The GPU predictor benchmark must keep working: its --smoke mode runs on the CPU in seconds, without Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_predictor.py"


def test_gpu_predictor_smoke_runs_every_mode_without_ray() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| mode |")]
    modes = {(row.split("|")[1].strip(), row.split("|")[2].strip()) for row in rows}
    assert modes == {(mode, batch) for mode in ("model", "tensors", "cpu-decode", "gpu-decode")
                     for batch in ("2", "4")}
    for row in rows:
        assert float(row.split("|")[3].replace(",", "")) > 0  # img/s measured


def test_gil_benchmark_smoke_measures_both_models_under_every_load() -> None:
    script = SCRIPT.parent / "bench_gil.py"
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| other")]
    assert [row[0].strip() for row in rows] == ["alone", "bursts (0.3 ms work / 1 ms pause)", "busy (no pause)"]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0
