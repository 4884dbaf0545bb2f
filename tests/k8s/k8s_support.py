"""Helpers of the deploy-file tests: repository paths, the pinned Ray version, kustomize and Helm renderers.

Nothing here needs a cluster. kustomize runs as `kubectl kustomize`; Helm charts are rendered with a `helm` binary
where one exists, else with the helm-python-sdk library (Helm's own Go code, no cluster needed). A module of its own
rather than conftest.py, because `from conftest import ...` is ambiguous next to tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
#: CI clones the repository with a read-only copy of shared/ beside it
SCHEMAS_DIR = REPO_ROOT.parent / "shared" / "schemas"
CHART_DIR = REPO_ROOT / "helm" / "taxonet"
OVERLAYS = ("cpu-dev", "gpu")


def pinned_ray_version() -> str:
    """The Ray version pinned in pyproject.toml (`ray[...]==X`)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml pins no exact Ray version (ray==X)")


def load_generator() -> ModuleType:
    """k8s/generate.py as a module (k8s/ is not a package)."""
    name = "taxonet_k8s_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "k8s" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def kustomize_build(path: Path) -> str:
    """`kubectl kustomize PATH` output (AssertionError with kustomize's message when it fails)."""
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return result.stdout


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm-style values merge: maps merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class HelmError(Exception):
    """Helm refused the values or failed to render."""


class HelmRenderer:
    """`helm template` / `helm lint` through the helm binary or the helm-python-sdk library."""

    def __init__(self) -> None:
        self.binary = shutil.which("helm")
        self.library: Any = None
        if self.binary is None:
            try:
                import helm_python
            except ImportError:
                helm_python = None
            self.library = helm_python

    @property
    def available(self) -> bool:
        return bool(self.binary or self.library)

    def template(self, values: dict[str, Any] | None = None, release: str = "taxonet",
                 namespace: str = "taxonet") -> dict[str, str]:
        """Rendered templates by file name (NOTES.txt included where the renderer provides it)."""
        if self.binary:
            with tempfile.TemporaryDirectory() as tmp:
                args = [self.binary, "template", release, str(CHART_DIR), "--namespace", namespace]
                args += self._values_args(values, Path(tmp))
                result = subprocess.run(args, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise HelmError(result.stderr)
            return {"all.yaml": result.stdout}
        try:
            # render() coalesces the values with the chart defaults and validates them against values.schema.json
            with self.library.Chart.load(str(CHART_DIR)) as chart:
                return chart.render(values=values or {}, name=release, namespace=namespace, is_install=True)
        except self.library.HelmError as exc:
            raise HelmError(str(exc)) from exc

    def lint(self, values: dict[str, Any] | None = None) -> list[str]:
        """Lint errors and warnings (strict mode); empty when the chart is clean."""
        if self.binary:
            with tempfile.TemporaryDirectory() as tmp:
                args = [self.binary, "lint", str(CHART_DIR), "--strict"] + self._values_args(values, Path(tmp))
                result = subprocess.run(args, capture_output=True, text=True, timeout=60)
            return [] if result.returncode == 0 else [result.stdout + result.stderr]
        report = self.library.lint(str(CHART_DIR), values, strict=True)
        return [f"{m.get('path')}: {m.get('error')}" for m in report.get("messages", [])
                if m.get("severity", 0) >= 2] + list(report.get("errors") or [])

    @staticmethod
    def _values_args(values: dict[str, Any] | None, directory: Path) -> list[str]:
        if not values:
            return []
        path = directory / "values.yaml"
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        return ["--values", str(path)]
