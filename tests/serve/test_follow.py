"""Serving follows a registry alias on S3 (moto's server over HTTP), on a real local Ray Serve over HTTP:

* started before anything is published, it answers 503 (with ``Retry-After``) and serves once a version is promoted,
  without a restart;
* an alias moved under 16 clients fails no request, and every image of every answer comes from the version the
  answer names (checked against each version's own outputs for that image);
* a damaged version is refused, the old one stays live (``/v1/model`` and the metrics say so), also on a replica
  started after the failure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from taxonet import registry, storage
from taxonet.serve.predictor import Predictor
from tests.checkpoint_support import damage_version, tiny_checkpoint
from tests.net_support import RequestLoop

from .helpers import SMALL, deploy, encode, replica_names, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

POLL_S = 1.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small_cnn checkpoints (32 px) with different weights: their answers to an image differ."""
    root = tmp_path_factory.mktemp("follow-serve")
    return {"a": tiny_checkpoint(root / "a", backbone="small_cnn", version="run-a", seed=1),
            "b": tiny_checkpoint(root / "b", backbone="small_cnn", version="run-b", seed=2)}


@pytest.fixture()
def cleanup() -> Iterator[Callable[[str], None]]:
    from ray import serve

    names: list[str] = []
    yield names.append
    for name in names:
        serve.delete(name)


def app_args(reference: str, classifier: dict[str, Any] | None = None) -> dict[str, Any]:
    # 16 clients at once: the ingress admits them all (its default admits 8 and answers 503 beyond)
    return {"model": reference, "model_poll_s": POLL_S, "max_batch_size": 4, "batch_wait_timeout_s": 0.005,
            "max_concurrent_requests": 16, "ingress": SMALL, "classifier": {**SMALL, **(classifier or {})}}


def classify(client: httpx.Client, image: bytes) -> httpx.Response:
    return client.post("/v1/classify", content=image, headers={"content-type": "image/jpeg"})


def metrics_text() -> str:
    import ray

    (port,) = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_serving_started_before_any_model_answers_503_then_serves_the_promoted_version(
        serve_http: str, s3_bucket: str, checkpoints: dict[str, Path], jpeg: bytes,
        cleanup: Callable[[str], None]) -> None:
    models = f"s3://{s3_bucket}/models"
    reference = f"{models}/demo@production"
    app, prefix = "taxonet-follow-wait", "/follow-wait"
    cleanup(app)
    deploy(app_args(reference), name=app, route_prefix=prefix)  # returns: the app runs without a model
    replicas = {d: replica_names(app, d) for d in ("TaxonetIngress", "TaxonetClassifier")}
    with httpx.Client(base_url=serve_http + prefix, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        for response in (client.get("/readyz"), classify(client, jpeg), client.get("/v1/taxonomy")):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "model_not_ready" and "does not exist yet" in error["message"]
        model = client.get("/v1/model").json()
        assert model["ready"] is False and model["version"] is None and model["model_reference"] == reference
        assert model["model_poll_s"] == POLL_S

        registry.publish(checkpoints["a"], models, "demo")
        registry.promote(models, "demo", 1, "production")
        wait_for(lambda: client.get("/readyz").status_code == 200, timeout=120, what="/readyz to turn 200")
        response = classify(client, jpeg)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == {"name": "demo", "version": "1"}
        model = client.get("/v1/model").json()
        assert model["ready"] is True and model["live"]["version"] == "1" and model["last_error"] is None
        assert model["checkpoint"] == registry.version_uri(models, "demo", 1)
    assert {d: replica_names(app, d) for d in replicas} == replicas, "no replica may be restarted"


def clients_loop(url: str, images: list[bytes], count: int) -> RequestLoop[tuple[int, dict[str, Any] | str, int]]:
    """``count`` loopback clients sending classify requests (odd ones: all ``images`` in one multipart request, even
    ones: the first image as a raw body) until stopped; records (status, body, images sent)."""
    def send(client: httpx.Client, index: int) -> tuple[int, dict[str, Any] | str, int]:
        if index % 2:
            response = client.post("/v1/classify", files=[("files", (f"{i}.jpg", data, "image/jpeg"))
                                                          for i, data in enumerate(images)])
            sent = len(images)
        else:
            response = classify(client, images[0])
            sent = 1
        return response.status_code, (response.json() if response.status_code == 200 else response.text), sent

    return RequestLoop(url, send, count, on_error=lambda exc: (-1, f"{type(exc).__name__}: {exc}", 0), join_s=65)


def expected_scores(uri: str, images: list[bytes]) -> np.ndarray:
    """Each image's winning score per rank from the version at ``uri``, computed here as the server does."""
    import torch

    predictor = Predictor.from_checkpoint(uri, "cpu")
    batch = torch.stack([predictor.preprocessor.decode(predictor.preprocessor.open(data)) for data in images])
    answers = predictor.predict_tensors(batch)
    return np.array([[answer.ranks[rank].score for rank in predictor.taxonomy.ranks] for answer in answers])


def test_an_alias_moved_under_16_clients_fails_no_request_and_mixes_no_versions(
        serve_http: str, s3_bucket: str, checkpoints: dict[str, Path], insect_images: list,
        cleanup: Callable[[str], None]) -> None:
    models = f"s3://{s3_bucket}/models"
    for name in ("a", "b"):
        registry.publish(checkpoints[name], models, "demo")
    registry.promote(models, "demo", 1, "production")
    images = [encode(image) for _, image in insect_images[:2]]
    expected = {str(v): expected_scores(registry.version_uri(models, "demo", v), images) for v in (1, 2)}
    assert np.abs(expected["1"] - expected["2"]).min() > 1e-3, "the two versions must answer differently"
    ranks = ("order", "family", "species")

    app, prefix = "taxonet-follow-load", "/follow-load"
    cleanup(app)
    deploy(app_args(f"{models}/demo@production", {"num_replicas": 2}), name=app, route_prefix=prefix)
    url = serve_http + prefix
    with clients_loop(url, images, count=16) as clients:
        clients.wait_for_answers(32)
        registry.promote(models, "demo", 2, "production")

        def every_replica_on_2() -> bool:
            seen = {}
            for _ in range(12):  # /v1/model reaches a replica chosen by Serve's router
                info = httpx.get(f"{url}/v1/model", timeout=30).json()
                seen[info["replica"]] = info["version"]
            return len(seen) == 2 and set(seen.values()) == {"2"}

        wait_for(every_replica_on_2, timeout=180, interval=1.0, what="both classifier replicas to load version 2")
        count = len(clients.snapshot())
        clients.wait_for_answers(count + 32)
    results = clients.snapshot()
    failures = [(status, body) for status, body, _ in results if status != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed while the alias moved: {failures[:5]}"
    versions = [body["model"]["version"] for _, body, _ in results]
    assert {"1", "2"} <= set(versions) <= {"1", "2"} and versions[-1] == "2"
    mixed = 0
    for _, body, sent in results:
        assert body["model"]["name"] == "demo" and len(body["predictions"]) == sent
        want = expected[body["model"]["version"]]
        for index, prediction in enumerate(body["predictions"]):
            scores = np.array([prediction["ranks"][rank]["score"] for rank in ranks])
            mixed += not np.allclose(scores, want[index], atol=1e-3)
    assert mixed == 0, f"{mixed} images were answered by another version than their answer names"
    print(f"alias moved under 16 clients: {len(results)} requests, {sum(s for *_, s in results)} images, "
          f"{versions.count('1')} answered by version 1, {versions.count('2')} by version 2, 0 failed, 0 mixed")


def test_a_damaged_version_is_refused_and_the_old_stays_live_also_on_a_replica_started_later(
        serve_http: str, s3_bucket: str, checkpoints: dict[str, Path], jpeg: bytes,
        cleanup: Callable[[str], None]) -> None:
    models = f"s3://{s3_bucket}/models"
    for name in ("a", "b"):
        registry.publish(checkpoints[name], models, "demo")
    registry.promote(models, "demo", 1, "production")
    app, prefix = "taxonet-follow-refuse", "/follow-refuse"
    cleanup(app)
    args = app_args(f"{models}/demo@production", {"num_replicas": 1})

    def deploy_config(classifier_replicas: int) -> None:
        """``serve deploy``'s path (as the RayService): a change of num_replicas alone scales in place."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        config = {"applications": [{
            "name": app, "route_prefix": prefix, "import_path": "taxonet.serve.app:app_builder", "args": args,
            "deployments": [{"name": "TaxonetClassifier", "num_replicas": classifier_replicas}]}]}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)

    deploy_config(1)
    url = serve_http + prefix
    first = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert first["version"] == "1" and first["load_failures"] == 0

    # Version 2 is damaged (one byte of its weights) and the alias moved to it: what a tampered or bit-rotten
    # object looks like (promote itself would refuse it: it verifies)
    damage_version(registry.version_uri(models, "demo", 2), "bad hash")
    current = registry.read_alias(models, "demo", "production")
    moved = registry.AliasRecord(model="demo", alias="production", version=2, updated=current.updated,
                                 history=(*current.history, {"version": 1, "updated": current.updated}))
    storage.write_bytes(registry.alias_uri(models, "demo", "production"), json.dumps(moved.to_dict()).encode())

    def refused() -> dict[str, Any] | None:
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        return info if info["load_failures"] else None

    info = wait_for(refused, timeout=120, what="version 2 to be refused")
    assert info["version"] == "1" and info["ready"] is True and info["load_failures"] == 1
    assert "refused demo version 2" in info["last_error"] and "does not match" in info["last_error"]
    assert "still serving version 1" in info["last_error"] and info["rollout_error"] == info["last_error"]
    with httpx.Client(base_url=url, timeout=30) as client:
        answers = [classify(client, jpeg) for _ in range(4)]
    assert all(r.status_code == 200 and r.json()["model"]["version"] == "1" for r in answers)

    def exported() -> bool:
        text = metrics_text()
        return (metric_value(text, "ray_taxonet_model_load_failures_total", application=app) >= 1
                and metric_value(text, "ray_taxonet_model_info", application=app, model="demo", version="1") == 1
                and metric_value(text, "ray_taxonet_model_ready", application=app) == 1)

    wait_for(exported, timeout=60, interval=1.0, what="the refusal and the live version on Ray's /metrics")

    # scale up: the new replica verifies version 2 itself, refuses it and serves what the alias pointed at before
    before = replica_names(app, "TaxonetClassifier")
    deploy_config(2)
    seen: dict[str, dict[str, Any]] = {}

    def both_replicas() -> bool:
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        seen[info["replica"]] = info
        return len(seen) == 2

    wait_for(both_replicas, timeout=120, interval=0.2, what="/v1/model answers from both classifier replicas")
    assert before < replica_names(app, "TaxonetClassifier"), "the first replica stays, a second one is added"
    for info in seen.values():
        assert info["version"] == "1" and info["ready"] is True and info["load_failures"] == 1, info
        assert "refused demo version 2" in info["last_error"]
    with httpx.Client(base_url=url, timeout=30) as client:
        answers = [classify(client, jpeg) for _ in range(8)]
    assert all(r.status_code == 200 and r.json()["model"]["version"] == "1" for r in answers)
