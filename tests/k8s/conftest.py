"""Fixtures for the deploy-file tests (helpers live in k8s_support.py). None of them needs a cluster."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# k8s_support/k8s_checks sit beside this file; make them importable under any pytest import mode
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from k8s_support import (  # noqa: E402
    CHART_DIR, OVERLAYS, REPO_ROOT, SCHEMAS_DIR, HelmRenderer, kustomize_build, pinned_ray_version)


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    if not (SCHEMAS_DIR / "kuberay" / "jsonschema").is_dir():
        pytest.skip(f"shared schemas not found at {SCHEMAS_DIR} (CI places a copy of shared/ beside the repo)")
    return SCHEMAS_DIR


@pytest.fixture(scope="session")
def ray_version() -> str:
    return pinned_ray_version()


@pytest.fixture(scope="session")
def rendered_overlays() -> dict[str, str]:
    """Rendered manifest text of every overlay, built once per session."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` renders the overlays")
    return {name: kustomize_build(REPO_ROOT / "k8s" / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def helm() -> HelmRenderer:
    renderer = HelmRenderer()
    if not renderer.available:
        pytest.skip("neither a helm binary nor the helm-python-sdk library: `helm lint`/`helm template` checks need "
                    "one (pip install helm-python-sdk)")
    return renderer


@pytest.fixture(scope="session")
def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def chart_schema() -> dict[str, Any]:
    return json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
