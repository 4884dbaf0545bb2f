"""The GPU training benchmark must keep working without Ray: its --smoke mode runs the per-worker loop (Parquet
shards → decode in DataLoader workers → train step with the paper loss) on the CPU in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"


def test_gpu_train_smoke_runs_without_ray() -> None:
    probe = "import runpy, sys; sys.argv = [sys.argv[1], '--smoke']; runpy.run_path(sys.argv[0], run_name='__main__');" \
            " assert 'ray' not in sys.modules, 'the GPU training script imported ray'"
    result = subprocess.run([sys.executable, "-c", probe, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| cpu |")]
    assert {row[5].strip() for row in rows} == {"tensors", "cpu-decode"}
    assert all(float(row[6].replace(",", "")) > 0 for row in rows)
