"""The Dockerfile builds on the Ray image the project pins (no docker engine here: static checks only)."""

from __future__ import annotations

import re
import sys
import tomllib

import pytest
from packaging.specifiers import SpecifierSet
from k8s_support import REPO_ROOT, pinned_ray_version

pytestmark = pytest.mark.k8s

DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones FROM lines can use)."""
    values = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            values[name] = default.strip('"')
    return values


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], text)


def test_base_images_match_the_pinned_ray_and_python() -> None:
    args = global_args()
    stages = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            image, _, alias = rest.partition(" AS ")
            stages[alias.strip() or "final"] = resolve(image, args)
    ray = pinned_ray_version()
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert stages["base-cpu"] == f"rayproject/ray:{ray}-{python_tag}"
    assert stages["base-gpu"] == f"rayproject/ray:{ray}-{python_tag}-gpu"
    # the final stage picks a variant by build arg, and the default variant exists
    assert stages["final"] == f"base-{args['FLAVOR']}" and f"base-{args['FLAVOR']}" in stages
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    version = f"{python_tag[2]}.{python_tag[3:]}"
    assert SpecifierSet(requires).contains(version), f"image Python {version} outside requires-python {requires}"


def test_image_installs_taxonet_as_a_non_root_user() -> None:
    steps = instructions()
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "numeric non-root USER (runAsNonRoot)"
    assert users[-1].split(":")[0] == "1000", "the Ray image's user `ray` (uid 1000) owns its Python"
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert re.search(r"pip install [^&]*\s\.(\s|$)", runs), "taxonet is installed with `pip install .`"
    assert "ray.__version__" in runs, "the build checks the image's Ray version"
    for keyword, rest in steps:
        if keyword == "COPY":
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                if not any(ch in source for ch in "*?["):
                    assert (REPO_ROOT / source).exists(), f"COPY source {source} missing"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", ".venv", "tests", "runs"} <= ignored
    assert "platform" not in ignored and "pyproject.toml" not in ignored
