"""The Dockerfile builds on the Ray image the project pins, with pinned dependencies in a layer of their own and
the code after them (no docker engine here: static checks, plus running the build's own check script)."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.specifiers import SpecifierSet
from k8s_support import REPO_ROOT, pinned_ray_version

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(60)]

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
    for module in ("ray.serve", "ray.train", "taxonet.cli", "taxonet.review.app", "uvicorn"):  # uvicorn: review page
        assert re.search(rf"import [^;\"]*\b{re.escape(module)}\b", runs), f"the build check imports {module}"
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


def test_dependencies_install_before_the_code_is_copied() -> None:
    """A change under platform/ must not invalidate the layer that downloads the dependencies."""
    steps = instructions()
    final = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    body = steps[final + 1:]
    copies = [(i, rest) for i, (keyword, rest) in enumerate(body) if keyword == "COPY"]
    code_copy = next(i for i, rest in copies if "platform" in rest.split())
    dependency_install = next(i for i, (keyword, rest) in enumerate(body)
                              if keyword == "RUN" and "-r requirements.txt" in rest)
    assert dependency_install < code_copy
    before = [rest for i, rest in copies if i < dependency_install]
    assert before and all(rest.split()[-2] == "pyproject.toml" for rest in before), before
    code_install = next(i for i, (keyword, rest) in enumerate(body) if keyword == "RUN" and "--no-deps ." in rest)
    assert code_install > code_copy


def test_heavy_dependencies_are_pinned_like_the_makefile() -> None:
    args = {rest.partition("=")[0]: rest.partition("=")[2] for keyword, rest in instructions() if keyword == "ARG"}
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    assert f"torch=={args['TORCH_VERSION']}" in makefile and f"torchvision=={args['TORCHVISION_VERSION']}" in makefile
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION", "PYARROW_VERSION", "NUMPY_VERSION"):
        assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", args.get(name, "")), f"{name} pinned to an exact version"
    runs = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    for package in ("torch", "torchvision", "pyarrow", "numpy", "ray"):
        assert f"{package}==%s" in runs, f"{package} is in the constraints file"
    assert "-c constraints.txt" in runs
    text = DOCKERFILE.read_text(encoding="utf-8")
    cpu_stage = text.split("AS base-cpu", 1)[1].split("FROM ", 1)[0]
    assert "download.pytorch.org/whl/cpu" in cpu_stage, "the CPU flavor installs CPU-only torch wheels"


def test_build_check_script_runs() -> None:
    """The version check the build runs is valid Python, and the image pins what this environment tests with."""
    steps = instructions()
    check = next(rest for keyword, rest in steps if keyword == "RUN" and "import ray, ray.serve" in rest)
    script = re.search(r'python -c "(.*?)" ', check).group(1)
    args = {rest.partition("=")[0]: rest.partition("=")[2] for keyword, rest in steps if keyword == "ARG"}
    script = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], script)
    compile(script, "build-check", "exec")
    versions = {name: metadata.version(name).split("+")[0]
                for name in ("ray", "torch", "torchvision", "pyarrow", "numpy")}
    wanted = {"ray": args["RAY_VERSION"] or pinned_ray_version(), "torch": args["TORCH_VERSION"],
              "torchvision": args["TORCHVISION_VERSION"], "pyarrow": args["PYARROW_VERSION"],
              "numpy": args["NUMPY_VERSION"]}
    assert versions == wanted, "the image pins what the tests run with"


def test_image_writes_only_to_mounted_paths() -> None:
    """Pods run with readOnlyRootFilesystem; the caches the code and its libraries use point below the emptyDirs
    the manifests mount (/tmp, /home/ray/.cache)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(line for line in text.splitlines() if line.startswith("ENV "))))
    for variable in ("XDG_CACHE_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[variable].startswith(("/tmp", "/home/ray/.cache")), variable
