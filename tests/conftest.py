"""Shared fixtures: a real S3 endpoint over HTTP (moto's server on 127.0.0.1) and a real local Ray.

Everything stays on loopback (ENVIRONMENT.md): Ray is told to use 127.0.0.1 and auth is disabled for the CLIs.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net_support import free_port  # noqa: F401  (tests import it from here too)

# Must be set before Ray starts anywhere in the test session (ENVIRONMENT.md: loopback only, CLIs without token).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# moto's server logs every request at INFO; failures should show the test's own output instead.
logging.getLogger("werkzeug").setLevel(logging.WARNING)

S3_ACCESS_KEY = "taxonet-test-key"
S3_SECRET_KEY = "taxonet-test-secret"
S3_REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1; yields its endpoint URL and exports the AWS variables."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")}
    os.environ.update({
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_REGION": S3_REGION,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
    })
    os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"taxonet-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=S3_ACCESS_KEY,
                          aws_secret_access_key=S3_SECRET_KEY, region_name=S3_REGION)
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """A real local Ray with 2 CPUs for the whole session (shared by Train, Data and Serve tests).

    Started after the S3 server so Ray's workers inherit the AWS_* variables, as pods inherit a mounted Secret.
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh local instance, never a cluster someone started with `ray start`
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def models(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A model registry root (taxonet.registry): a local directory, or a prefix in a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "models")
    return f"s3://{request.getfixturevalue('s3_bucket')}/models"
