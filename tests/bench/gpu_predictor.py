"""Inference throughput of the taxonet predictor on one GPU — JPEG bytes in, predictions out, WITHOUT Ray.

This is exactly what a ``TaxonetClassifier`` replica runs (``taxonet.serve.predictor.Predictor``: bf16 autocast,
channels_last, per-rank top-k, anomaly test, lowest reliable rank, JSON-ready answers), measured in raw PyTorch so it
runs on a bare GPU box that has PyTorch, torchvision, Pillow, NumPy, SciPy and PyYAML but not Ray or FastAPI.
Model: ResNet50-MTL (3 rank heads, random init) at 224 px. Images: pre-resized JPEG crops (the prepared-dataset
layout, ``--source-side`` px) or photos (``--source-side 800``). Modes:

* ``model``      — forward pass only on ready tensors (the GPU ceiling; ENVIRONMENT.md anchor 12,734 img/s);
* ``tensors``    — ``predict_tensors`` on ready tensors: forward + answers (top-k, anomaly test, dicts);
* ``cpu-decode`` — PIL decode + resize to uint8 in a thread pool (what the ingress does), then the GPU batch
                   (normalised on the device, as the classifier does); the next batch is decoded while this one runs;
* ``gpu-decode`` — JPEG bytes decoded, resized and normalised on the device (``preprocess_jpeg_on_device``: nvjpeg
                   via ``torchvision.io.decode_jpeg``), what GPU serving runs with ``jpeg_decode`` auto/model.
                   Target: ≥ 5,000 img/s on one H100.

Every mode is run at each ``--batch-sizes`` value; the script prints a Markdown table of img/s and batch latency.

GPU:   PYTHONPATH=platform python tests/bench/gpu_predictor.py
CPU smoke (seconds; tests/serve/test_bench_smoke.py runs it): python tests/bench/gpu_predictor.py --smoke
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

from taxonet.anomaly import AnomalyThresholds, ClassThreshold
from taxonet.config import ModelConfig
from taxonet.data.transforms import TransformSpec
from taxonet.models import build_model
from taxonet.serve.predictor import Predictor
from taxonet.taxonomy import Taxonomy

MODES = ("model", "tensors", "cpu-decode", "gpu-decode")


def make_jpegs(count: int, side: int, seed: int = 0) -> list[bytes]:
    """Distinct, photo-like JPEGs (smooth colour fields + shapes), quality 90: about 29 KB at 256 px."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    height = side * 3 // 4 if side > 256 else side  # "photos" are 4:3, crops square
    for _ in range(count):
        base = rng.integers(0, 255, size=(max(2, height // 8), max(2, side // 8), 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((side, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, side, size=2))
            r = int(rng.integers(max(1, side // 16), max(2, side // 4)))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def random_thresholds(taxonomy: Taxonomy, seed: int = 0) -> AnomalyThresholds:
    """Plausible per-class thresholds, so the anomaly test and confidence run as with a trained checkpoint."""
    rng = np.random.default_rng(seed)
    rows = []
    for rank in taxonomy.ranks:
        for index, name in enumerate(taxonomy.names[taxonomy.level(rank)]):
            mean, std = float(rng.normal(0.0, 0.05)), 0.05
            rows.append(ClassThreshold(rank, index, name, mean, std, mean - 2 * std, 50))
    return AnomalyThresholds(rows, k=2.0)


def build_predictor(backbone: str, size: int, device: str, amp: bool, channels_last: bool) -> Predictor:
    taxonomy = Taxonomy.demo()
    model = build_model(ModelConfig(backbone=backbone, weights=None, dropout=0.5, hidden=512), taxonomy)
    info = {"name": f"{backbone}_mtl-random", "version": "bench", "checkpoint": None}
    return Predictor(model, taxonomy, TransformSpec(input_size=size), random_thresholds(taxonomy), device=device,
                     top_k=3, amp=amp, channels_last=channels_last, info=info)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(run_batch: Callable[[int], object], batches: int, warmup: int,
                 device: torch.device) -> list[float]:
    """Seconds per batch after ``warmup`` untimed batches (each timed batch ends with its results on the host)."""
    for step in range(warmup):
        run_batch(step)
    sync(device)
    seconds = []
    for step in range(batches):
        start = time.perf_counter()
        run_batch(warmup + step)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench(predictor: Predictor, mode: str, jpegs: list[bytes], batch_size: int, batches: int, warmup: int,
          decode_threads: int) -> list[float]:
    """Seconds per batch. ``cpu-decode`` decodes batch i+1 in the pool while batch i runs, and each batch's time is
    the interval between answers."""
    device = predictor.device

    def chunk(step: int) -> list[bytes]:
        start = (step * batch_size) % len(jpegs)
        return [jpegs[(start + i) % len(jpegs)] for i in range(batch_size)]

    if mode in ("model", "tensors"):
        ready = torch.stack([predictor.preprocessor.decode_uint8(data) for data in chunk(0)])
        if mode == "model":
            return time_batches(lambda step: predictor.logits(ready), batches, warmup, device)
        return time_batches(lambda step: predictor.predict_tensors(ready), batches, warmup, device)
    if mode == "gpu-decode":
        return time_batches(lambda step: predictor.predict_tensors(predictor.preprocess_jpeg_on_device(chunk(step))),
                            batches, warmup, device)
    with ThreadPoolExecutor(max(1, decode_threads)) as pool:
        def decode(step: int) -> torch.Tensor:
            return torch.stack(list(pool.map(predictor.preprocessor.decode_uint8, chunk(step))))

        seconds: list[float] = []
        pending = pool.submit(decode, 0)
        last = time.perf_counter()
        for step in range(warmup + batches):
            batch = pending.result()
            pending = pool.submit(decode, step + 1)
            answers = predictor.predict_tensors(batch)
            assert len(answers) == batch_size
            now = time.perf_counter()
            if step >= warmup:
                seconds.append(now - last)
            last = now
        pending.result()
    return seconds


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224, help="model input side (default: 224)")
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per (mode, batch size)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=1024, help="distinct JPEGs cycled through")
    parser.add_argument("--source-side", type=int, default=256, help="stored crop side; 800 for 800x600 photos")
    parser.add_argument("--decode-threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script still works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.size, args.batch_sizes, args.batches, args.warmup = "tiny_cnn", 32, "2,4", 2, 1
        args.images, args.source_side, args.decode_threads, args.device = 8, 48, 2, "cpu"
    predictor = build_predictor(args.backbone, args.size, args.device, args.amp, args.channels_last)
    device = predictor.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    jpegs = make_jpegs(args.images, args.source_side)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, "
          f"{args.backbone} at {args.size} px, {len(jpegs)} JPEGs of {args.source_side} px "
          f"(mean {statistics.mean(map(len, jpegs)) / 1024:.1f} KB), amp={args.amp and device.type == 'cuda'}, "
          f"channels_last={predictor.channels_last}, decode threads {args.decode_threads}", flush=True)
    rows: list[dict[str, object]] = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for mode in modes:
            seconds = bench(predictor, mode, jpegs, batch_size, args.batches, args.warmup, args.decode_threads)
            total = sum(seconds)
            row = {"mode": mode, "batch": batch_size, "img_per_s": batch_size * len(seconds) / total,
                   "p50_ms": 1000 * statistics.median(seconds),
                   "p99_ms": 1000 * float(np.percentile(seconds, 99))}
            rows.append(row)
            print(f"{mode:>10}  batch {batch_size:>4}: {row['img_per_s']:>10,.0f} img/s  "
                  f"p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms", flush=True)
    print("\n| mode | batch | img/s | batch p50 ms | batch p99 ms |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['batch']} | {row['img_per_s']:,.0f} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} |")
    # the point of this script: the predictor stands alone, no Ray/FastAPI on the path
    leaked = sorted(name for name in ("ray", "fastapi", "starlette") if name in sys.modules)
    if leaked:
        raise SystemExit(f"the predictor path imported {leaked}; it must run without them")
    return rows


if __name__ == "__main__":
    main()
