"""The whole chain as a user runs it, every part real and on 127.0.0.1.

moto S3 server → `taxonet data synth` to S3 → `ray start --head` → `ray job submit` of a training run writing to S3 →
Ray Serve on that cluster loading the S3 checkpoint → classify over HTTP → Prometheus scrapes the head's metrics port
and answers a PromQL query with exactly the number of requests sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import boto3
import pytest

from tests.e2e.conftest import BIN, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_job_submit_train_then_serve_from_s3_and_scrape(e2e_env, ray_head, tmp_path):
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

    # --- serve the S3 checkpoint on the same cluster and classify over HTTP
    import httpx
    import ray
    from ray import serve

    from taxonet.data.pipeline import iter_parquet_batches
    from taxonet.serve.app import app_builder
    from taxonet.taxonomy import Taxonomy
    from tests.conftest import free_port
    from tests.prometheus_support import running_prometheus, wait_for_value

    ray.init(address=ray_head.address)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"checkpoint": summary["best_checkpoint"], "device": "cpu",
                           "ingress": {"num_cpus": 0.1}, "classifier": {"num_cpus": 0.25}}),
              name="taxonet", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/v1/model", timeout=30).json()["checkpoint"] == summary["best_checkpoint"]
    batch = next(iter_parquet_batches("s3://jobs/ds", "test", 4, shuffle=False))
    taxonomy = Taxonomy.demo()
    for data in batch["image"]:
        response = httpx.post(f"{url}/v1/classify", content=bytes(data), headers={"Content-Type": "image/jpeg"},
                              timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        answer = answer["predictions"][0]
        chain = [answer["ranks"][rank]["label"] for rank in taxonomy.ranks]
        assert answer["consistent"] == taxonomy.is_consistent(
            [taxonomy.index(rank, name) for rank, name in zip(taxonomy.ranks, chain)])
    bad = httpx.post(f"{url}/v1/classify", content=b"not an image", headers={"Content-Type": "image/jpeg"},
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"]
    sent_ok, sent_bad = len(batch["image"]), 1

    # --- Prometheus scrapes the head node's metrics export port; the counts are exact
    with running_prometheus(f"127.0.0.1:{ray_head.metrics_port}", tmp_path / "prometheus") as prometheus:
        wait_for_value(prometheus, 'sum(ray_taxonet_requests_total{route="/v1/classify",status="200"})',
                       float(sent_ok), timeout=90)
        wait_for_value(prometheus, 'sum(ray_taxonet_requests_total{route="/v1/classify",status="400"})',
                       float(sent_bad), timeout=30)
    serve.shutdown()
