#!/usr/bin/env bash
# One device call for all GPU checks (none needs Ray); output tee'd to $OUT/gpu_bench.log when OUT is set.
# Usage, from the repository root on a machine with a CUDA GPU:
#   bash tests/bench/gpu_all.sh                  # smoke + train + predictor
#   bash tests/bench/gpu_all.sh smoke train      # a subset
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=platform
parts=${*:-smoke train predictor}
log=${OUT:-/tmp}/gpu_bench.log
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  for part in $parts; do
    case $part in
      smoke)
        echo "## smoke: the training loop + Predictor on the GPU"
        timeout 120 python3 tests/bench/gpu_smoke.py ;;
      train)
        echo "## train, ResNet50-MTL 224 px batch 256"
        timeout 150 python3 tests/bench/gpu_train.py --model resnet50 --size 224 --batch 256 --steps 30
        for w in 10 14; do
          echo "## train, ResNet50-MTL 224 px batch 256, $w decode processes"
          timeout 90 python3 tests/bench/gpu_train.py --model resnet50 --size 224 --batch 256 --steps 30 \
              --workers $w --modes cpu-decode
        done
        echo "## train, ResNet50-MTL 128 px batch 512 (the paper's input size)"
        timeout 90 python3 tests/bench/gpu_train.py --model resnet50 --size 128 --batch 512 --steps 20 \
            --stored-side 160
        echo "## train, EfficientNet-B3-MTL 300 px batch 256"
        timeout 90 python3 tests/bench/gpu_train.py --model efficientnet_b3 --size 300 --batch 256 --steps 15 \
            --stored-side 320 --modes tensors,gpu-decode ;;
      predictor)
        echo "## predictor, ResNet50-MTL 224 px"
        timeout 150 python3 tests/bench/gpu_predictor.py --batch-sizes 128,256,512 --batches 25 ;;
      *) echo "unknown part $part (smoke, train, predictor)"; exit 2 ;;
    esac
  done
} 2>&1 | tee "$log"
