"""The whole chain as a user runs it, every part real and on 127.0.0.1, serving started before training.

moto S3 server → `taxonet data synth` to S3 → `ray start --head` → Ray Serve on that cluster following
`s3://jobs/models/demo@production`, which does not exist yet (503 with Retry-After) → `ray job submit` of a training
run writing to S3 that then publishes its best checkpoint and promotes it → serving picks it up without a restart →
classify over HTTP, the answers naming the new version → Prometheus scrapes the head's metrics port and shows the
live version and exactly the number of requests sent.
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


MODEL = "s3://jobs/models/demo@production"


def test_serve_first_then_job_submit_trains_and_promotes_and_serving_follows(e2e_env, ray_head, tmp_path):
    import httpx
    import ray
    from ray import serve

    from taxonet.data.pipeline import iter_parquet_batches
    from taxonet.serve.app import app_builder
    from taxonet.taxonomy import Taxonomy
    from tests.conftest import free_port
    from tests.prometheus_support import running_prometheus, wait_for_value

    boto3.client("s3").create_bucket(Bucket="jobs")
    synth = subprocess.run([str(BIN / "taxonet"), "data", "synth", "s3://jobs/ds", "--per-species", "16",
                            "--image-size", "32", "--unseen-per-family", "0"],
                           env=e2e_env, capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr[-3000:]

    # --- serving comes up first, following an alias nothing has been promoted to
    ray.init(address=ray_head.address)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"model": MODEL, "model_poll_s": 2, "device": "cpu",
                           "ingress": {"num_cpus": 0.1}, "classifier": {"num_cpus": 0.25}}),
              name="taxonet", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    waiting = httpx.get(f"{url}/readyz", timeout=30)
    assert waiting.status_code == 503 and waiting.headers["retry-after"] == "2", waiting.text
    assert waiting.json()["error"]["code"] == "model_not_ready"

    # --- the documented job (docs/training.md): the repo as working dir, the venv's Python as the entrypoint;
    # training itself publishes the run to the registry and promotes it to the alias serving follows
    train = [sys.executable, "-m", "taxonet.cli", "train", "--config", "demo",
             "--set", "data.dataset=s3://jobs/ds", "--set", "train.storage=s3://jobs/runs",
             "--set", "train.run_name=submitted", "--set", "optim.epochs=1", "--set", "data.input_size=32",
             "--set", "model.backbone=tiny_cnn",
             "--set", "registry.uri=s3://jobs/models", "--set", "registry.promote=production"]
    entrypoint = train
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
    published = summary["published"]
    assert published["version"] == 1 and published["alias"] == "production" and not published["reused"], published

    # --- serving follows within model_poll_s, no restart
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, httpx.get(f"{url}/v1/model", timeout=30).text
        time.sleep(1)
    model = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert model["version"] == "1" and model["name"] == "demo" and model["model_reference"] == MODEL
    assert model["checkpoint"] == "s3://jobs/models/demo/versions/000001"
    batch = next(iter_parquet_batches("s3://jobs/ds", "test", 4, shuffle=False))
    taxonomy = Taxonomy.demo()
    for data in batch["image"]:
        response = httpx.post(f"{url}/v1/classify", content=bytes(data), headers={"Content-Type": "image/jpeg"},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == {"name": "demo", "version": "1"}
        answer = response.json()["predictions"][0]
        chain = [answer["ranks"][rank]["label"] for rank in taxonomy.ranks]
        assert answer["consistent"] == taxonomy.is_consistent(
            [taxonomy.index(rank, name) for rank, name in zip(taxonomy.ranks, chain)])
    bad = httpx.post(f"{url}/v1/classify", content=b"not an image", headers={"Content-Type": "image/jpeg"},
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"]
    sent_ok, sent_bad = len(batch["image"]), 1

    # --- Prometheus scrapes the head node's metrics export port: the live version, and exact classify counts (only
    # /readyz was asked before the promotion)
    with running_prometheus(f"127.0.0.1:{ray_head.metrics_port}", tmp_path / "prometheus") as prometheus:
        wait_for_value(prometheus, 'sum(ray_taxonet_model_info{model="demo",version="1"})', 1.0, timeout=90)
        wait_for_value(prometheus, 'sum(ray_taxonet_model_ready)', 1.0, timeout=30)
        wait_for_value(prometheus, 'sum(ray_taxonet_requests_total{route="/v1/classify",status="200"})',
                       float(sent_ok), timeout=90)
        wait_for_value(prometheus, 'sum(ray_taxonet_requests_total{route="/v1/classify",status="400"})',
                       float(sent_bad), timeout=30)
        wait_for_value(prometheus, 'sum(ray_taxonet_requests_total{route="/readyz",status="503"}) >= bool 1', 1.0,
                       timeout=30)
    serve.shutdown()
