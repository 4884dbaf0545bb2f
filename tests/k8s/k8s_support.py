"""Helpers of the deploy-file tests: repository paths, the pinned Ray version, kustomize and Helm renderers.

Nothing here needs a cluster or the network. kustomize runs as `kubectl kustomize` (kubectl ships with this
project's machine image); Helm charts are rendered with a `helm` binary where one exists, else with the
helm-python-sdk library (a dev dependency: Helm's own Go code, no cluster needed). The JSON schemas are vendored in
tests/k8s/schemas. A missing tool fails the tests with what to install: they never skip. A module of its own rather
than conftest.py, because `from conftest import ...` is ambiguous next to tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
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
#: strict JSON schemas of every kind the manifests use (SOURCE.md there says where they come from)
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
CHART_DIR = REPO_ROOT / "helm" / "taxonet"
OVERLAYS = ("cpu-dev", "gpu")
#: the chart's values files besides values.yaml, by name
CHART_VALUES_FILES = {"cpu-dev": CHART_DIR / "values-cpu-dev.yaml", "gpu": CHART_DIR / "values-gpu.yaml"}


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


def require_tool(name: str, hint: str) -> str:
    """Path of a command-line tool the tests need (AssertionError saying how to install it when missing)."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found on PATH: {hint}")
    return path


def kustomize_build(path: Path) -> str:
    """`kubectl kustomize PATH` output (AssertionError with kustomize's message when it fails)."""
    result = subprocess.run([require_tool("kubectl", "kubectl (with kustomize) renders k8s/; install kubectl"),
                             "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return result.stdout


def k8s_tree_with_dev_secrets(destination: Path) -> Path:
    """A copy of k8s/ whose cpu-dev overlay has run make-secrets.sh, as a user does first; returns the copy."""
    tree = destination / "k8s"
    shutil.copytree(REPO_ROOT / "k8s", tree, ignore=shutil.ignore_patterns("*.env"))
    subprocess.run(["sh", str(tree / "overlays" / "cpu-dev" / "make-secrets.sh")], check=True, capture_output=True,
                   timeout=60)
    return tree


# ---------------------------------------------------------------------------------------------------------------
# The contracts the manifests are written against, checked with the package's own parsers. Two of them land with
# other branches (issue 14): the `registry:` run-config section and the Serve args `model`/`model_poll_s`. Until the
# package has them, these helpers check those keys against the contract here and pass the rest to the package.

REGISTRY_KEYS = {"uri", "name", "promote"}


def load_run_config(name: str, overrides: list[str]):  # noqa: ANN201
    """taxonet.config.load_config(name, overrides), registry.* checked against contract 3 if the package lacks it."""
    from taxonet.config import RunConfig, load_config

    if "registry" not in {f.name for f in dataclasses.fields(RunConfig)}:
        registry = [o for o in overrides if o.startswith("registry.")]
        for override in registry:
            key, _, value = override.partition("=")
            assert key.split(".", 1)[1] in REGISTRY_KEYS, f"{key} is not a registry key of contract 3"
            assert value == "" or key != "registry.uri" or re.match(r"^(s3://|file://|/)", value), override
        overrides = [o for o in overrides if o not in registry]
    return load_config(name, overrides)


def validate_serve_args(args: dict[str, Any]) -> None:
    """ServeArgs.model_validate(args); `model`/`model_poll_s` checked against contract 4 if the package lacks them."""
    from taxonet.serve.config import ServeArgs

    if "model" not in ServeArgs.model_fields:
        args = dict(args)
        reference = args.pop("model")
        poll = args.pop("model_poll_s", 30)
        assert re.match(r"^(s3://[^/]+/.+|file:///.+|/.+)$", reference), f"not a model reference: {reference}"
        assert isinstance(poll, (int, float)) and poll > 0, f"model_poll_s must be a positive number: {poll}"
        args["checkpoint"] = reference.split("@", 1)[0]
    ServeArgs.model_validate(args)


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
            except ImportError as exc:
                raise AssertionError("neither a helm binary nor the helm-python-sdk library (a dev dependency: "
                                     "pip install -e '.[dev]') to render the chart") from exc
            self.library = helm_python

    def values_from_yaml(self, text: str) -> dict[str, Any]:
        """A values document read as Helm reads it (Go YAML: `1e-5` is a number), not as PyYAML would."""
        if self.library is not None:
            return self.library.values_from_yaml(text)
        return yaml.safe_load(text)  # the helm binary gets the text itself through _values_args

    def template(self, values: dict[str, Any] | None = None, release: str = "taxonet",
                 namespace: str = "taxonet", chart: Path = CHART_DIR) -> dict[str, str]:
        """Rendered templates by file name (NOTES.txt included where the renderer provides it)."""
        if self.binary:
            with tempfile.TemporaryDirectory() as tmp:
                args = [self.binary, "template", release, str(chart), "--namespace", namespace]
                args += self._values_args(values, Path(tmp))
                result = subprocess.run(args, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise HelmError(result.stderr)
            return {"all.yaml": result.stdout}
        try:
            # render() coalesces the values with the chart defaults and validates them against values.schema.json
            with self.library.Chart.load(str(chart)) as loaded:
                return loaded.render(values=values or {}, name=release, namespace=namespace, is_install=True)
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
