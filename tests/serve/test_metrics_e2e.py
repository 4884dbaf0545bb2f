"""Metrics end to end: Ray's metrics export → a real Prometheus server (Debian's ``prometheus``) → PromQL.

The app serves a checkpoint whose anomaly thresholds nothing passes, so every rank of every answer is unsure and the
expected counts are exact: the test sends a known mix of requests and Prometheus must report exactly that many.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.prometheus_support import query, running_prometheus, wait_for_value

from .helpers import SMALL, deploy, encode, variant, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

APP = "taxonet-metrics"
PREFIX = "/metrics-app"
VERSION = "metrics-v1"
#: the names docs/metrics.md promises (and the Grafana dashboard queries), as exported by Ray
EXPORTED = {
    "ray_taxonet_requests_total": "counter",
    "ray_taxonet_stage_latency_seconds": "histogram",
    "ray_taxonet_batch_size": "histogram",
    "ray_taxonet_predictions_total": "counter",
    "ray_taxonet_unsure_total": "counter",
    "ray_taxonet_model_info": "gauge",
    "ray_taxonet_model_ready": "gauge",
}


def metrics_export_port() -> int:
    import ray

    ports = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    assert len(ports) == 1, f"expected the one local node, got metrics ports {ports}"
    return int(ports.pop())


@pytest.fixture(scope="module")
def prometheus(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server on 127.0.0.1 scraping the local Ray node's metrics port every second; yields its URL."""
    with running_prometheus(f"127.0.0.1:{metrics_export_port()}", tmp_path_factory.mktemp("prometheus")) as url:
        yield url


@pytest.fixture(scope="module")
def app(serve_http: str, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    strict = variant(checkpoint, tmp_path_factory.mktemp("strict") / "ckpt", version=VERSION, strict_thresholds=True)
    deploy({"checkpoint": str(strict), "max_batch_size": 4, "batch_wait_timeout_s": 0.005, "ingress": SMALL,
            "classifier": SMALL}, name=APP, route_prefix=PREFIX)
    yield serve_http + PREFIX
    serve.delete(APP)


def test_prometheus_counts_exactly_the_requests_sent(app: str, prometheus: str, jpeg: bytes,
                                                     insect_images: list) -> None:

    good = [encode(image) for _, image in insect_images[:6]]
    bad = [(b"", "image/jpeg"), (jpeg[:100], "image/jpeg"), (b"text", "text/plain")]
    statuses: dict[int, int] = {}
    unsure = 0
    with httpx.Client(base_url=app, timeout=30) as client:
        for data in good:
            response = client.post("/v1/classify", content=data, headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
            unsure += sum(not r["reliable"] for r in response.json()["predictions"][0]["ranks"].values())
            statuses[200] = statuses.get(200, 0) + 1
        for data, content_type in bad:
            status = client.post("/v1/classify", content=data, headers={"content-type": content_type}).status_code
            statuses[status] = statuses.get(status, 0) + 1
        assert client.get("/v1/model").status_code == 200
    assert statuses == {200: 6, 400: 2, 415: 1}
    assert unsure == 6 * 3  # strict thresholds: every rank unsure

    selector = f'application="{APP}"'
    sent = sum(statuses.values())
    wait_for_value(prometheus, f'sum(ray_taxonet_requests_total{{{selector},route="/v1/classify"}})', sent)
    for status, count in statuses.items():
        wait_for_value(prometheus, f'sum(ray_taxonet_requests_total{{{selector},route="/v1/classify",'
                                   f'status="{status}"}})', count)
    wait_for_value(prometheus, f'sum(ray_taxonet_requests_total{{{selector},route="/v1/model"}})', 1)
    wait_for_value(prometheus, f'sum(ray_taxonet_predictions_total{{{selector}}})', 6 * 3)
    wait_for_value(prometheus, f'sum(ray_taxonet_unsure_total{{{selector}}})', unsure)
    wait_for_value(prometheus, f'sum(ray_taxonet_unsure_total{{{selector},rank="species"}})', 6)
    # one client, one request at a time: six batches of one image. Ray estimates a histogram's _sum from bucket
    # midpoints; the batch-size buckets are built so that small sizes come out exact (taxonet.serve.metrics).
    wait_for_value(prometheus, f'sum(ray_taxonet_batch_size_count{{{selector}}})', 6)
    wait_for_value(prometheus, f'sum(ray_taxonet_batch_size_bucket{{{selector},le="1.5"}})', 6)
    wait_for_value(prometheus, f'sum(ray_taxonet_batch_size_bucket{{{selector},le="0.5"}})', 0)
    wait_for_value(prometheus, f'sum(ray_taxonet_batch_size_sum{{{selector}}})', 6)
    wait_for_value(prometheus, f'sum(ray_taxonet_stage_latency_seconds_count{{{selector},stage="total"}})', sent)
    wait_for_value(prometheus, f'sum(ray_taxonet_stage_latency_seconds_count{{{selector},stage="decode"}})', 6)
    wait_for_value(prometheus, f'sum(ray_taxonet_stage_latency_seconds_count{{{selector},stage="inference"}})', 6)
    wait_for_value(prometheus, f'sum(ray_taxonet_model_info{{{selector},version="{VERSION}",model="quick"}})', 1)
    buckets = query(prometheus, f'sum by (le) (ray_taxonet_stage_latency_seconds_bucket{{{selector},stage="total"}})')
    assert max(buckets.values()) == sent  # the +Inf bucket holds every request


def test_exported_names_match_the_documentation(app: str, prometheus: str, jpeg: bytes) -> None:
    """The names on Ray's /metrics page are the ones docs/metrics.md lists (and Grafana queries)."""
    response = httpx.post(f"{app}/v1/classify", content=jpeg, headers={"content-type": "image/jpeg"}, timeout=30)
    assert response.status_code == 200
    found: dict[str, Any] = {}

    def exported() -> bool:
        found["text"] = httpx.get(f"http://127.0.0.1:{metrics_export_port()}/metrics", timeout=10).text
        found["types"] = dict(re.findall(r"^# TYPE (ray_taxonet_\w+) (\w+)$", found["text"], flags=re.MULTILINE))
        return EXPORTED.items() <= found["types"].items()

    try:
        wait_for(exported, timeout=45, interval=1.0, what="every taxonet metric on Ray's /metrics")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; found {found.get('types')}") from None
    text = found["text"]
    for name in ("ray_taxonet_stage_latency_seconds_bucket", "ray_taxonet_batch_size_bucket"):
        assert re.search(rf"^{name}\{{.*le=", text, flags=re.MULTILINE), name
    # Serve's replica tags come with every series: dashboards select by application
    assert re.search(rf'^ray_taxonet_requests_total{{[^}}]*application="{APP}"', text, flags=re.MULTILINE)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text(encoding="utf-8")
    for name in [*EXPORTED, "ray_taxonet_stage_latency_seconds_bucket", "ray_taxonet_batch_size_bucket"]:
        assert name in docs, f"{name} missing from docs/metrics.md"
