#!/usr/bin/env bash
# ONE device call for issue 16's GPU figures (about 8 minutes on one H100/H200; installs nothing): the product's
# training path (`taxonet train`: Ray Train + Ray Data + the worker, both data.decode modes) next to the raw-PyTorch
# anchor, and serving over HTTP through Ray Serve with the classifier on the GPU next to the in-process GPU
# predictor; then one summary table. Output tee'd to $OUT/gpu_bench.log, results as JSON/Markdown under $OUT.
#
# Before the call, on the CPU machine (once): WITH_SERVE=1 bash tests/bench/gpu_pack_ray.sh 3.12 (Ray with Serve)
# and `.raypack` in .git/info/exclude; then the device call, with carry [".raypack"]:
#   bash tests/bench/gpu_all.sh                 # train + serve + decode + summary
#   bash tests/bench/gpu_all.sh train           # a subset of: train serve decode summary smoke loop predictor
# Every part runs under its own timeout, so one failing part still leaves the others' numbers.
# SMOKE=1 runs the same parts on a CPU with tiny settings (tests/integration/test_gpu_all_smoke.py).
set -u
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bundle=.raypack/ray-py$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])').tar.xz
if [ -f "$bundle" ] && [ ! -d /tmp/raysite/ray ]; then
  mkdir -p /tmp/raysite && tar -xJf "$bundle" -C /tmp/raysite
fi
export PYTHONPATH=/tmp/raysite:$root/platform:$root
parts=${*:-train serve decode summary}
out=${OUT:-/tmp/taxonet-gpu}
mkdir -p "$out"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; nproc
  "$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  "$python" -c "import ray; print('ray', ray.__version__)" || echo "no Ray: carry the bundle (.raypack)"
  for part in $parts; do
    case $part in
      train)
        echo "## taxonet train on the GPU: ResNet50-MTL 128 px b512 + 224 px b256, EfficientNet-B3-MTL 128 px b256"
        train_args=(--cases r50-128,r50-224,b3-128 --epochs 3)
        if [ "${SMOKE:-0}" = 1 ]; then train_args=(--smoke); fi
        timeout 420 "$python" tests/bench/gpu_product_train.py "${train_args[@]}" --decode cpu,gpu --out "$out/train" ;;
      serve)
        echo "## serving over HTTP, classifier on the GPU (ResNet50-MTL 128 px), ingress scaled to the cores"
        "$python" -c "import ray.serve" 2>/dev/null || echo "Ray Serve missing: pack with WITH_SERVE=1"
        serve_args=(--device cuda --backbone resnet50 --size 128 --image-side 128 --batch-size 128 --threads 4
                    --batch-wait-s 0.01 --concurrency 32,128 --seconds 10 --images-per-request 8
                    --ingress-replicas auto)
        if [ "${SMOKE:-0}" = 1 ]; then
          serve_args=(--device cpu --backbone small_cnn --size 32 --image-side 48 --batch-size 4 --concurrency 2
                      --seconds 2 --ingress-replicas auto --num-cpus 4)
        fi
        timeout 180 "$python" tests/bench/bench_serve.py "${serve_args[@]}" --json "$out/serve.json" ;;
      decode)
        echo "## decode + augment rate of the two data paths (PIL threads vs DeviceCollator), 128 and 256 px crops"
        decode_args=(--device cuda --batch 512 --batches 10)
        if [ "${SMOKE:-0}" = 1 ]; then decode_args=(--device cpu --batch 16 --batches 1 --threads 1); fi
        timeout 120 "$python" tests/bench/gpu_decode.py "${decode_args[@]}" ;;
      summary)
        "$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
train = out / "train" / "gpu_product_train.json"
targets = {"ResNet50-MTL 128 px": "≥ 0.85", "ResNet50-MTL 224 px": "≥ 0.90"}
for r in json.loads(train.read_text()) if train.exists() else []:
    rows.append((f"taxonet train, {r['case']} b{r['batch']}, decode {r['decode']}", r["after_warmup"], r["anchor"],
                 "raw-PyTorch anchor", targets.get(r["case"], "reported")))
serve = out / "serve.json"
if serve.exists():
    s = json.loads(serve.read_text())
    best = max(s["rows"], key=lambda row: row["img_per_s"] / row["baseline"])
    rows.append((f"HTTP through Serve, {best['clients']} clients, {s['ingress_replicas']} ingress replicas",
                 best["img_per_s"], best["baseline"], "in-process GPU predictor", "≥ 0.80 and ≥ 5,000 img/s"))
print("| measurement | img/s | reference img/s | reference | ratio | target |\n|---|---|---|---|---|---|")
for name, value, reference, what, target in rows:
    print(f"| {name} | {value:,.0f} | {reference:,.0f} | {what} | {value / reference:.2f} | {target} |")
if not rows:
    print("| (no results: see the log above) | | | | | |")
PY
        ;;
      smoke)
        echo "## smoke: the training loop + Predictor on the GPU (no Ray)"
        timeout 120 "$python" tests/bench/gpu_smoke.py ;;
      loop)
        echo "## standalone loop (no Ray), ResNet50-MTL 128 px batch 512"
        timeout 90 "$python" tests/bench/gpu_train.py --model resnet50 --size 128 --batch 512 --steps 20 \
            --stored-side 128 ;;
      predictor)
        echo "## in-process predictor, ResNet50-MTL 224 px"
        timeout 150 "$python" tests/bench/gpu_predictor.py --batch-sizes 128,256,512 --batches 25 ;;
      *) echo "unknown part $part (train serve decode summary smoke loop predictor)"; exit 2 ;;
    esac
  done
} 2>&1 | tee "$out/gpu_bench.log"
