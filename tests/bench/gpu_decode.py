"""Decode + augment rate of the two training data paths, on the same JPEG crops, side by side.

* ``cpu``: :class:`taxonet.data.pipeline.Collator` (PIL decode, torchvision transforms per image) with ``--threads``
  loader threads — what ``data.decode: cpu`` runs in the worker;
* ``device``: :class:`taxonet.data.device_decode.DeviceCollator` (one ``decode_jpeg`` call per batch, resize and the
  paper's augmentations per batch) on ``--device`` — what ``data.decode: gpu`` runs (nvjpeg on a CUDA device; on a
  CPU the same code with libjpeg, which says nothing about GPU speed but checks the path).

For crops stored at the input size (``prepare --train-size``) and at prepare's default 256 px. Prints a Markdown
table of train-batch img/s. No Ray.

GPU:  python3 tests/bench/gpu_decode.py --device cuda --batch 512 --threads 14
CPU:  python tests/bench/gpu_decode.py --device cpu --batch 64 --batches 3
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from taxonet.data.device_decode import DeviceCollator  # noqa: E402
from taxonet.data.pipeline import Collator  # noqa: E402
from taxonet.data.synthetic import SyntheticInsects  # noqa: E402
from taxonet.data.transforms import TransformSpec  # noqa: E402
from taxonet.taxonomy import Taxonomy  # noqa: E402


def crops(side: int, count: int, taxonomy: Taxonomy) -> dict[str, list]:
    """A column batch of ``count`` synthetic JPEG crops (quality 90, prepare's default) of ``side`` px."""
    generator = SyntheticInsects(taxonomy, image_size=side, seed=0)
    images, labels = [], {rank: [] for rank in taxonomy.ranks}
    chains = generator.chains
    for index in range(count):
        chain = chains[index % len(chains)]
        buffer = io.BytesIO()
        generator.render(chain, index).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
        for rank, name in zip(taxonomy.ranks, chain):
            labels[rank].append(name)
    return {"image": images, **labels}


def rate(collate: Collator, batch: dict[str, list], batches: int, device: torch.device) -> float:
    collate(batch)  # warm-up (thread pool, cuDNN/nvjpeg handles)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        images, _ = collate(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * images.shape[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=128, help="input size (default 128, the paper's)")
    parser.add_argument("--stored", default="", help="comma list of stored crop sides (default: SIZE,256)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="loader threads of the cpu path (default: cores - 2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the device path's CPU kernels get the cores the cpu path's threads get
        torch.set_num_threads(args.threads)
    taxonomy = Taxonomy.demo()
    spec = TransformSpec(input_size=args.size)
    stored = [int(s) for s in args.stored.split(",")] if args.stored else [args.size, 256]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"- date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {name}; {os.cpu_count()} cores; "
          f"torch {torch.__version__}; input {args.size} px, batch {args.batch}, {args.batches} batches, train "
          f"transform (the paper's augmentations)\n")
    print(f"| stored px | cpu path, {args.threads} threads, img/s | device path on {device.type}, img/s | "
          "device / cpu |\n|---|---|---|---|")
    for side in stored:
        batch = crops(side, args.batch, taxonomy)
        cpu_path = Collator(taxonomy, spec, train=True, threads=args.threads)
        device_path = DeviceCollator(taxonomy, spec, train=True, device=device)
        cpu_rate = rate(cpu_path, batch, args.batches, torch.device("cpu"))
        device_rate = rate(device_path, batch, args.batches, device)
        cpu_path.close()
        print(f"| {side} | {cpu_rate:,.0f} | {device_rate:,.0f} | {device_rate / cpu_rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
