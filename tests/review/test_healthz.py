"""The review page's health route, which the Kubernetes probes of the packaged review Deployment call (k8s/, helm/):
it answers without a token, and everything else still asks for one."""

from __future__ import annotations

import pytest
import requests

from tests.review.review_support import serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_healthz_answers_without_a_token_while_the_api_needs_one(tmp_path) -> None:
    with serving(str(tmp_path / "queue"), str(tmp_path / "labels")) as base:
        health = requests.get(f"{base}/healthz", timeout=30)
        assert health.status_code == 200, health.text
        assert health.json() == {"status": "ok"}
        assert requests.get(f"{base}/api/me", timeout=30).status_code == 401
        assert requests.get(f"{base}/healthz", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 200
