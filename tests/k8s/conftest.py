"""Fixtures for the deploy-file tests (helpers live in k8s_support.py). None of them needs a cluster or the network,
and none skips: a missing tool is a failure that says what to install."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# k8s_support/k8s_checks sit beside this file; make them importable under any pytest import mode
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from k8s_support import (  # noqa: E402
    CHART_DIR, OVERLAYS, SCHEMAS_DIR, HelmRenderer, k8s_tree_with_dev_secrets, kustomize_build, pinned_ray_version)


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    return SCHEMAS_DIR


@pytest.fixture(scope="session")
def ray_version() -> str:
    return pinned_ray_version()


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ after `overlays/cpu-dev/make-secrets.sh` (the cpu-dev overlay needs its untracked Secrets)."""
    return k8s_tree_with_dev_secrets(tmp_path_factory.mktemp("k8s-tree"))


@pytest.fixture(scope="session")
def rendered_overlays(k8s_tree: Path) -> dict[str, str]:
    """Rendered manifest text of every overlay, built once per session."""
    return {name: kustomize_build(k8s_tree / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def helm() -> HelmRenderer:
    return HelmRenderer()


@pytest.fixture(scope="session")
def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def chart_schema() -> dict[str, Any]:
    return json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
