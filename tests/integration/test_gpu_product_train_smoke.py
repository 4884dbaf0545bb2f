"""The GPU benchmark of the product's training path keeps working: its --smoke mode runs the raw-PyTorch anchor and
`taxonet train` (Ray Train + Ray Data + the product's worker) on the CPU with a tiny model, once per decode mode
(data.decode cpu, and gpu = the device decode code run on the CPU), and prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "bench" / "gpu_product_train.py"


@pytest.mark.timeout(600)
def test_gpu_product_train_smoke_on_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT)])
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny_cnn 32 px (smoke) |")]
    assert [row.split("|")[2].strip() for row in rows] == ["cpu", "gpu"], result.stdout[-3000:]  # both decode modes
    records = json.loads((tmp_path / "gpu_product_train.json").read_text())
    assert [r["decode"] for r in records] == ["cpu", "gpu"]
    for record in records:
        assert record["anchor"] > 0
        assert len(record["per_epoch"]) == 2 and all(v > 0 for v in record["per_epoch"])  # one warm-up, one measured
        assert record["after_warmup"] == pytest.approx(record["per_epoch"][1], abs=0.06)  # per_epoch: 1 decimal
        assert record["ratio"] == pytest.approx(record["after_warmup"] / record["anchor"])
    assert (tmp_path / "gpu_product_train.md").read_text().strip().endswith(rows[-1].strip())
