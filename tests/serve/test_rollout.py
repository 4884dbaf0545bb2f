"""Rolling out a new checkpoint while clients keep sending requests: no request may fail.

Two ways a model is replaced:

* ``serve.run`` again with new arguments (what ``taxonet serve`` and scripts do) — Serve starts new replicas and
  drains the old ones;
* a Serve config whose only change is the classifier's ``user_config`` (what ``serve deploy`` and the RayService do)
  — the running replicas load the new checkpoint in place (``reconfigure``), no replica is replaced; a refused one
  is kept out, also by a replica added afterwards.

The new checkpoint also changes the input size (32 → 40 px), so the ingress must pick up the new preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.net_support import RequestLoop

from .helpers import SMALL, deploy, replica_names, variant, wait_for

pytestmark = pytest.mark.integration


def client_loop(url: str, image: bytes, clients: int = 2) -> RequestLoop[tuple[int, str]]:
    """Loopback clients sending classify requests until stopped; records (status, model version) per answer."""
    def send(client: httpx.Client, _: int) -> tuple[int, str]:
        response = client.post("/v1/classify", content=image, headers={"content-type": "image/jpeg"})
        return response.status_code, (response.json()["model"]["version"] if response.status_code == 200
                                      else response.text)

    return RequestLoop(url, send, clients, on_error=lambda exc: (-1, f"{type(exc).__name__}: {exc}"), timeout_s=30,
                       join_s=35)


def wait_for_version(loop: RequestLoop[tuple[int, str]], version: str, timeout: float) -> None:
    wait_for(lambda: any(v == version for _, v in loop.snapshot()[-4:]), timeout, interval=0.2,
             what=f"answers from model version {version}")


def assert_no_failures(results: list[tuple[int, str]], old: str, new: str) -> None:
    failures = [r for r in results if r[0] != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed during the rollout: {failures[:5]}"
    versions = [v for _, v in results]
    assert old in versions and new in versions, set(versions)
    assert versions[-1] == new


def app_args(checkpoint: Path) -> dict[str, Any]:
    return {"checkpoint": str(checkpoint), "max_batch_size": 4, "batch_wait_timeout_s": 0.005,
            "ingress": SMALL, "classifier": SMALL}


@pytest.fixture(scope="module")
def versions(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollout")
    return {"rollout-v1": variant(checkpoint, root / "v1", version="rollout-v1"),
            "rollout-v2": variant(checkpoint, root / "v2", version="rollout-v2", input_size=40)}


@pytest.fixture()
def cleanup() -> Iterator[Callable[[str], None]]:
    from ray import serve

    names: list[str] = []
    yield names.append
    for name in names:
        serve.delete(name)


def test_serve_run_again_replaces_the_model_without_failed_requests(serve_http: str, versions: dict[str, Path],
                                                                    jpeg: bytes,
                                                                    cleanup: Callable[[str], None]) -> None:
    app, prefix = "taxonet-rollout-run", "/rollout-run"
    cleanup(app)
    deploy(app_args(versions["rollout-v1"]), name=app, route_prefix=prefix)
    with client_loop(serve_http + prefix, jpeg) as loop:
        loop.wait_for_answers(5)
        deploy(app_args(versions["rollout-v2"]), name=app, route_prefix=prefix)  # returns once the new app runs
        wait_for_version(loop, "rollout-v2", timeout=30)
        count = len(loop.snapshot())
        loop.wait_for_answers(count + 5)
    assert_no_failures(loop.snapshot(), "rollout-v1", "rollout-v2")
    model = httpx.get(f"{serve_http}{prefix}/v1/model", timeout=30).json()
    assert model["version"] == "rollout-v2" and model["checkpoint"] == str(versions["rollout-v2"])
    assert model["transform"]["input_size"] == 40


def test_user_config_rolls_out_in_place_without_failed_requests(serve_http: str, versions: dict[str, Path],
                                                                jpeg: bytes, tmp_path: Path,
                                                                cleanup: Callable[[str], None]) -> None:
    """The ``serve deploy`` path: a config that only changes the classifier's user_config reconfigures live replicas.

    Then a broken checkpoint is rolled out the same way: it is refused, reported, and the running model stays.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app, prefix = "taxonet-rollout-config", "/rollout-config"
    cleanup(app)
    client = _get_global_client()

    def config(classifier_user_config: dict[str, Any] | None, replicas: int = 1) -> ServeDeploySchema:
        application: dict[str, Any] = {"name": app, "route_prefix": prefix,
                                       "import_path": "taxonet.serve.app:app_builder",
                                       "args": app_args(versions["rollout-v1"])}
        if classifier_user_config is not None:
            application["deployments"] = [{"name": "TaxonetClassifier", "user_config": classifier_user_config,
                                           "num_replicas": replicas}]
        return ServeDeploySchema.model_validate({"applications": [application]})

    client.deploy_apps(config(None), _blocking=True)
    before = {d: replica_names(app, d) for d in ("TaxonetIngress", "TaxonetClassifier")}
    with client_loop(serve_http + prefix, jpeg) as loop:
        loop.wait_for_answers(5)
        assert {v for _, v in loop.snapshot()} == {"rollout-v1"}
        client.deploy_apps(config({"checkpoint": str(versions["rollout-v2"]), "max_batch_size": 8}))
        wait_for_version(loop, "rollout-v2", timeout=30)
        count = len(loop.snapshot())
        loop.wait_for_answers(count + 5)
    assert_no_failures(loop.snapshot(), "rollout-v1", "rollout-v2")
    after = {d: replica_names(app, d) for d in before}
    assert after == before, "a user_config change must not replace replicas"
    model = httpx.get(f"{serve_http}{prefix}/v1/model", timeout=30).json()
    assert model["version"] == "rollout-v2" and model["transform"]["input_size"] == 40
    assert model["max_batch_size"] == 8 and model["rollout_error"] is None

    broken = variant(versions["rollout-v1"], tmp_path / "broken", version="broken")
    (broken / "model.pt").write_bytes(b"truncated")  # no longer matches checkpoint.json: refused on load
    client.deploy_apps(config({"checkpoint": str(broken)}))

    def reported() -> dict[str, Any] | None:
        info = httpx.get(f"{serve_http}{prefix}/v1/model", timeout=30).json()
        return info if info.get("rollout_error") else None

    model = wait_for(reported, timeout=30, what="the failed rollout to be reported")
    assert model["version"] == "rollout-v2" and "does not match" in model["rollout_error"]
    response = httpx.post(f"{serve_http}{prefix}/v1/classify", content=jpeg, headers={"content-type": "image/jpeg"},
                          timeout=30)
    assert response.status_code == 200 and response.json()["model"]["version"] == "rollout-v2"
    assert {d: replica_names(app, d) for d in before} == before  # nothing was taken down

    # Serve recorded the refused user_config: a replica started now (scale-up) must not fail on it. It refuses the
    # broken checkpoint too and serves what the running replica serves.
    client.deploy_apps(config({"checkpoint": str(broken)}, replicas=2), _blocking=True)
    seen: dict[str, dict[str, Any]] = {}

    def both() -> bool:
        info = httpx.get(f"{serve_http}{prefix}/v1/model", timeout=30).json()
        seen[info["replica"]] = info
        return len(seen) == 2

    wait_for(both, timeout=120, interval=0.2, what="/v1/model from both classifier replicas")
    assert before["TaxonetClassifier"] < replica_names(app, "TaxonetClassifier")
    for info in seen.values():
        assert info["version"] == "rollout-v2" and info["ready"] is True, info
        assert "does not match" in info["rollout_error"] and info["model_reference"] == str(broken)
    with httpx.Client(base_url=serve_http + prefix, timeout=30) as http:
        answers = [http.post("/v1/classify", content=jpeg, headers={"content-type": "image/jpeg"}) for _ in range(6)]
    assert all(r.status_code == 200 and r.json()["model"]["version"] == "rollout-v2" for r in answers)
