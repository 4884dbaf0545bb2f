# taxonet on the Ray image that matches the project's pins (ray[train,serve]==2.60.0 in pyproject.toml, Python 3.11).
# The same image runs every Ray pod (head, workers, job submitter), the Jobs and `taxonet` commands; KubeRay requires
# the head and workers to share Ray and Python versions.
#
#   docker build --build-arg FLAVOR=gpu -t registry.example.com/taxonet:0.1.0-gpu .   # CUDA base, GPU node pools
#   docker build --build-arg FLAVOR=cpu -t taxonet:0.1.0-cpu .                        # CPU base + CPU torch, laptops
#
# Two layers: the dependencies (from pyproject.toml alone, pinned below) and then the code, so a code change
# rebuilds only the small last layer instead of downloading gigabytes of wheels again.
# Keep RAY_VERSION equal to the pin in pyproject.toml and rayVersion in k8s/ and helm/, and the torch pins equal to
# the Makefile's (tests/k8s/test_dockerfile.py checks all of them).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG FLAVOR=gpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu
# CPU-only torch/torchvision wheels (no CUDA libraries: a far smaller image); versions carry a +cpu local tag.
ENV TAXONET_TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu
# torch from PyPI: its CUDA 13.0 build, as measured (ENVIRONMENT.md); nodes need an NVIDIA driver for CUDA 13.
# For older drivers build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128.
ENV TAXONET_TORCH_INDEX=""

# An unknown FLAVOR fails here ("base-<flavor>" not found) instead of silently building the wrong variant.
FROM base-${FLAVOR}

# Re-declared: an ARG before the first FROM is visible only in FROM lines.
ARG RAY_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PYARROW_VERSION=26.0.1
ARG NUMPY_VERSION=2.4.6
# Overrides the flavor's torch index ("" = PyPI).
ARG TORCH_INDEX=""
# Optional extra package index (a mirror), e.g. inside a network without PyPI access.
ARG PIP_EXTRA_INDEX_URL=""

# The Ray images run as user `ray` (uid 1000, gid 100 "users") with a user-owned Python; install and run as that
# user. Numeric, so Kubernetes can enforce runAsNonRoot without resolving a user name.
USER 1000:100
RUN mkdir -p /home/ray/taxonet-src
WORKDIR /home/ray/taxonet-src

# --- dependency layer: pyproject.toml's dependencies with torch, torchvision, pyarrow and numpy pinned ------------
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
    && printf 'torch==%s\ntorchvision==%s\npyarrow==%s\nnumpy==%s\nray==%s\n' "$TORCH_VERSION" \
      "$TORCHVISION_VERSION" "$PYARROW_VERSION" "$NUMPY_VERSION" "$RAY_VERSION" > constraints.txt \
    && index="${TORCH_INDEX:-$TAXONET_TORCH_INDEX}" \
    && pip install --no-cache-dir -r requirements.txt -c constraints.txt \
      ${index:+--extra-index-url "$index"} ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"}

# --- code layer ------------------------------------------------------------------------------------------------
COPY --chown=1000:100 README.m[d] ./
COPY --chown=1000:100 platform ./platform
# A regular (non-editable) install without dependencies (all installed above); the source copy is removed. The
# checks fail the build when a pin did not hold or an entry point of the pods does not import.
RUN pip install --no-cache-dir --no-deps . \
    && cd /home/ray && rm -rf /home/ray/taxonet-src \
    && python -c "import ray, ray.serve, ray.train, taxonet.cli, taxonet.review.app, uvicorn, torch, torchvision, \
pyarrow, numpy; \
versions = {'ray': (ray.__version__, '${RAY_VERSION}'), 'torch': (torch.__version__, '${TORCH_VERSION}'), \
'torchvision': (torchvision.__version__, '${TORCHVISION_VERSION}'), 'pyarrow': (pyarrow.__version__, \
'${PYARROW_VERSION}'), 'numpy': (numpy.__version__, '${NUMPY_VERSION}')}; \
wrong = {k: v for k, v in versions.items() if v[0].split('+')[0] != v[1]}; \
assert not wrong, wrong" \
    && taxonet --help > /dev/null

WORKDIR /home/ray
# Pods run with readOnlyRootFilesystem: only /tmp, /tmp/ray, /home/ray/.cache and /dev/shm are writable (emptyDirs),
# so every cache goes below them. Usage stats off: the clusters may have no internet access.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/home/ray/.cache \
    TORCH_HOME=/home/ray/.cache/torch \
    TRITON_CACHE_DIR=/home/ray/.cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    RAY_USAGE_STATS_ENABLED=0
