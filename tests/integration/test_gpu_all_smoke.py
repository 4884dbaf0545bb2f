"""The one prepared GPU script keeps working: ``SMOKE=1 bash tests/bench/gpu_all.sh`` runs its training part
(`taxonet train` with both data.decode modes next to the anchor, tiny model on the CPU), its serving part
(bench_serve.py with the GPU mode's flags on the CPU: scaled ingress replicas, real HTTP through Ray Serve beside
the in-process predictor), its decode part (gpu_decode.py) and prints the summary table from what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_gpu_all_smoke_on_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "tests" / "bench" / "gpu_all.sh")], env=env, capture_output=True,
                            text=True, timeout=840, cwd=ROOT)
    log = result.stdout
    assert result.returncode == 0, log[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "gpu_bench.log").read_text() == log
    summary = log[log.index("| measurement | img/s |"):].splitlines()
    rows = [line for line in summary if line.startswith("| ") and not line.startswith("| measurement")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "taxonet train, tiny_cnn 32 px (smoke) b8, decode cpu", "taxonet train, tiny_cnn 32 px (smoke) b8, decode gpu",
        "HTTP through Serve, 2 clients, 1 ingress replicas"]
    for row in rows:
        assert float(row.split("|")[2].replace(",", "")) > 0
    serve = json.loads((tmp_path / "serve.json").read_text())
    assert serve["rows"][0]["errors"] == 0
    decode_rows = [line for line in log.splitlines() if line.startswith(("| 128 |", "| 256 |"))]
    assert len(decode_rows) == 2, log[-3000:]  # the decode part: both data paths on 128 and 256 px crops
