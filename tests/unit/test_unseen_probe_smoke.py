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


def test_unseen_probe_summarises_seeds() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--outlier-weight", "0.35", "--size", "24", "--epochs", "1",
                             "--per-species", "3", "--per-outlier", "2", "--threads", "1", "--seeds", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    seeds = [re.search(r"seed=(\d+)", line).group(1) for line in result.stdout.splitlines()
             if line.startswith("RESULT ")]
    assert seeds == ["0", "1"]
    summary = re.findall(r"^  (.+): (\d\.\d{3}) ± (\d\.\d{3}) \((\d\.\d{3})–(\d\.\d{3}), n=2\)$", result.stdout,
                         flags=re.MULTILINE)
    assert len(summary) == 7, result.stdout
    for _label, mean, _sd, low, high in summary:
        assert float(low) <= float(mean) <= float(high)
