# taxonet on the Ray image that matches the project's pins (ray[train,serve]==2.60.0 in pyproject.toml, Python 3.11).
# The same image runs every Ray pod (head, workers, job submitter) and `taxonet` commands; KubeRay requires the
# head and workers to share Ray and Python versions.
#
#   docker build --build-arg FLAVOR=gpu -t registry.example.com/taxonet:0.1.0-gpu .   # CUDA base, GPU node pools
#   docker build --build-arg FLAVOR=cpu -t taxonet:0.1.0-cpu .                        # CPU base, dev clusters
#
# Keep RAY_VERSION equal to the pin in pyproject.toml and rayVersion in k8s/ and helm/ (tests/k8s checks all three).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG FLAVOR=gpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu

# An unknown FLAVOR fails here ("base-<flavor>" not found) instead of silently building the wrong variant.
FROM base-${FLAVOR}

# Re-declared: an ARG before the first FROM is visible only in FROM lines.
ARG RAY_VERSION
# Optional extra package index, e.g. https://download.pytorch.org/whl/cpu for a CPU-only torch in FLAVOR=cpu.
ARG PIP_EXTRA_INDEX_URL=""

# The Ray images run as user `ray` (uid 1000, gid 100 "users") with a user-owned Python; install and run as that
# user. Numeric, so Kubernetes can enforce runAsNonRoot without resolving a user name.
# The build directory is made by that user too (a WORKDIR-created directory may be root-owned, and the setuptools
# build writes into it).
USER 1000:100
RUN mkdir -p /home/ray/taxonet-src
WORKDIR /home/ray/taxonet-src
COPY --chown=1000:100 pyproject.toml README.m[d] ./
COPY --chown=1000:100 platform ./platform
# A regular (non-editable) install; the source copy is removed afterwards. The checks fail the build when the image's
# Ray is not the pinned one or the CLI does not start.
RUN pip install --no-cache-dir ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} . \
    && cd /home/ray && rm -rf /home/ray/taxonet-src \
    && python -c "import ray, taxonet; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
    && taxonet --help > /dev/null

WORKDIR /home/ray
ENV PYTHONUNBUFFERED=1
