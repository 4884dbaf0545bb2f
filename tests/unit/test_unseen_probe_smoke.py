"""tests/bench/unseen_probe.py (the script behind docs/evaluation.md's outlier-exposure table) must keep running."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "unseen_probe.py"


@pytest.mark.parametrize("weight", ["0", "0.35"])
def test_unseen_probe_prints_its_result_line(weight: str) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--outlier-weight", weight, "--size", "24", "--epochs", "1",
                             "--per-species", "3", "--per-outlier", "2", "--threads", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert f"outlier_weight={weight} " in line
    values = [float(v) for v in re.findall(r"(?:F1|species|rank|right|AUROC) (\d\.\d+)", line)]
    assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values), line
