"""`ray job submit` of a training run against a `ray start --head` cluster, dataset and runs on S3."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import boto3
import pytest

from tests.e2e.conftest import BIN, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_ray_job_submit_trains_to_s3(e2e_env, ray_head, tmp_path):
    boto3.client("s3").create_bucket(Bucket="jobs")
    synth = subprocess.run([str(BIN / "taxonet"), "data", "synth", "s3://jobs/ds", "--per-species", "16",
                            "--image-size", "32", "--unseen-per-family", "0"],
                           env=e2e_env, capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr[-3000:]
    # The documented command (docs/training.md): the repo as working dir, the venv's Python as the entrypoint.
    entrypoint = [sys.executable, "-m", "taxonet.cli", "train", "--config", "demo",
                  "--set", "data.dataset=s3://jobs/ds", "--set", "train.storage=s3://jobs/runs",
                  "--set", "train.run_name=submitted", "--set", "optim.epochs=1", "--set", "data.input_size=32",
                  "--set", "model.backbone=tiny_cnn"]
    for _attempt in range(20):  # the dashboard answers before its job agent is up ("No available agent")
        submitted = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard,
                                    "--working-dir", str(REPO), "--", *entrypoint],
                                   env=e2e_env, capture_output=True, text=True, timeout=600, cwd=REPO)
        output = submitted.stdout + submitted.stderr
        if "No available agent" not in output:
            break
        time.sleep(3)
    assert submitted.returncode == 0, output[-5000:]
    assert "succeeded" in output.lower(), output[-3000:]
    summary = json.loads(output[output.index("{\n"):output.rindex("\n}") + 2])
    assert summary["best_checkpoint"] == "s3://jobs/runs/submitted/best"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="jobs", Prefix="runs/submitted/best/")
            .get("Contents", [])]
    assert "runs/submitted/best/checkpoint.json" in keys and "runs/submitted/best/thresholds.json" in keys
