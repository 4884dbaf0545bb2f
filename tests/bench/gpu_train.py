"""GPU training throughput of one taxonet worker, data path included — runs WITHOUT Ray.

The train steps are the product's: :func:`taxonet.train.loop.train_one_epoch` (the function every epoch of a Ray
Train worker runs) on the model, loss and optimiser of :func:`taxonet.train.loop.build_training`, fed by three data
paths (Parquet shards → JPEG decode → augment → bf16/channels_last), so it runs on a bare GPU box that has only
PyTorch, torchvision, pyarrow, numpy and PyYAML. The figure is the loop's own images/s (steps after the warm-up,
timed up to the device's last step). It prints a table of images/s for:

* ``tensors``   — the train step alone on pre-made tensors (the ENVIRONMENT.md anchor: 3,773 img/s for
                  ResNet50-MTL at 224 px, batch 256 on one H100);
* ``cpu-decode``— Parquet → PIL decode (JPEG draft mode) in DataLoader worker processes → GPU train step;
* ``gpu-decode``— Parquet bytes → nvjpeg (torchvision.io.decode_jpeg on the GPU) → resize/flip on GPU → train step.

Usage (GPU):   PYTHONPATH=platform python tests/bench/gpu_train.py --batch 256 --size 224
Usage (CPU smoke, seconds): PYTHONPATH=platform python tests/bench/gpu_train.py --smoke
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

from taxonet.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from taxonet.taxonomy import Taxonomy  # noqa: E402
from taxonet.train.loop import build_training, train_one_epoch  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
DEMO_ROWS = [
    ("Coleoptera", "Coccinellidae", "Coccinella septempunctata"),
    ("Diptera", "Syrphidae", "Episyrphus balteatus"), ("Diptera", "Syrphidae", "Eupeodes corollae"),
    ("Diptera", "Syrphidae", "Eristalis tenax"), ("Hymenoptera", "Apidae", "Apis mellifera"),
    ("Hymenoptera", "Apidae", "Bombus lapidarius"), ("Hymenoptera", "Apidae", "Bombus terrestris"),
    ("Hymenoptera", "Vespidae", "Vespula vulgaris"), ("Lepidoptera", "Nymphalidae", "Aglais urticae"),
]


def make_shards(directory: Path, n_images: int, side: int, n_unique: int = 256, shards: int = 8) -> list[Path]:
    """Parquet shards of pre-resized JPEG crops (the prepared-dataset layout: image bytes + rank labels)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    encoded = []
    for i in range(n_unique):
        base = rng.integers(0, 255, size=(side // 8, side // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((side, side), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, side, size=2)
            r = int(rng.integers(side // 16, side // 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    labels = [DEMO_ROWS[i % len(DEMO_ROWS)] for i in range(n_images)]
    paths = []
    per_shard = (n_images + shards - 1) // shards
    for s in range(shards):
        rows = range(s * per_shard, min(n_images, (s + 1) * per_shard))
        table = pa.table({
            "image": pa.array([encoded[i % n_unique] for i in rows], pa.binary()),
            "order": [labels[i][0] for i in rows], "family": [labels[i][1] for i in rows],
            "species": [labels[i][2] for i in rows], "split": ["train"] * len(rows),
        })
        path = directory / f"part-{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=256)
        paths.append(path)
    return paths


class ShardStream(torch.utils.data.IterableDataset):
    """Rows of the shards, split over DataLoader workers; PIL decode with draft mode, random flips, resize."""

    def __init__(self, paths: list[Path], taxonomy: Taxonomy, size: int, epochs: int) -> None:
        self.paths, self.taxonomy, self.size, self.epochs = paths, taxonomy, size, epochs

    def __iter__(self):
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(worker)
        for _ in range(self.epochs):
            for index, path in enumerate(self.paths * max(1, workers // len(self.paths) + 1)):
                if index % workers != worker:
                    continue
                table = pq.read_table(path, columns=["image", "order", "family", "species"])
                images = table.column("image").to_pylist()
                ranks = [table.column(r).to_pylist() for r in ("order", "family", "species")]
                for i, data in enumerate(images):
                    image = Image.open(io.BytesIO(data))
                    image.draft("RGB", (self.size, self.size))
                    image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                    array = np.asarray(image)
                    if rng.random() < 0.5:
                        array = array[:, ::-1]
                    if rng.random() < 0.5:
                        array = array[::-1]
                    target = self.taxonomy.encode([ranks[0][i], ranks[1][i], ranks[2][i]])
                    yield torch.from_numpy(array.copy()), torch.tensor(target)


class Run:
    """The model, loss and optimiser of a worker (the paper's: Adam 1e-4, α = 0.5) and the loop over them."""

    def __init__(self, args: argparse.Namespace, taxonomy: Taxonomy, device: torch.device) -> None:
        self.config = RunConfig(model=ModelConfig(backbone=args.model, weights=None),
                                train=TrainConfig(amp=args.amp, channels_last=args.channels_last))
        self.model, self.loss_fn, self.optimizer = build_training(self.config, taxonomy, device)
        self.args, self.taxonomy, self.device = args, taxonomy, device

    def images_per_s(self, batches) -> float:
        """Warm-up steps, then the measured ones, both through the product's epoch function."""
        batches = iter(batches)
        for steps in (self.args.warmup, self.args.steps):
            metrics = train_one_epoch(self.model, batches, self.loss_fn, self.optimizer, self.device, self.taxonomy,
                                      amp=self.config.train.amp, channels_last=self.config.train.channels_last,
                                      max_steps=steps)
        return metrics["images_per_s"]


def normalise(uint8_nhwc: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = uint8_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = (x - MEAN.to(device)) / STD.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def bench_tensors(args, taxonomy, device) -> float:
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1, (args.batch, 3), device=device)
    return Run(args, taxonomy, device).images_per_s(iter(lambda: (images, targets), None))


def bench_cpu_decode(args, taxonomy, device, paths) -> float:
    loader = torch.utils.data.DataLoader(
        ShardStream(paths, taxonomy, args.size, epochs=1000), batch_size=args.batch, num_workers=args.workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if args.workers else None,
        persistent_workers=bool(args.workers))
    run = Run(args, taxonomy, device)
    return run.images_per_s((normalise(images, device, args.channels_last), targets) for images, targets in loader)


def bench_gpu_decode(args, taxonomy, device, paths) -> float:
    from torchvision.io import decode_jpeg

    table = pa.concat_tables([pq.read_table(p) for p in paths])
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in table.column("image").to_pylist()]
    targets_all = torch.tensor([taxonomy.encode(r) for r in zip(*(table.column(c).to_pylist()
                                                                  for c in ("order", "family", "species")))])

    def batch(step: int):
        index = [(step * args.batch + i) % len(blobs) for i in range(args.batch)]
        decoded = decode_jpeg([blobs[i] for i in index], device=device)
        if len({tuple(d.shape) for d in decoded}) == 1:  # prepared crops share one size: one resize per batch
            images = torch.stack(decoded).float()
            if images.shape[-2:] != (args.size, args.size):
                images = F.interpolate(images, size=(args.size, args.size), mode="bilinear", antialias=False)
        else:
            images = torch.stack([F.interpolate(d.unsqueeze(0).float(), size=(args.size, args.size),
                                                mode="bilinear", antialias=False)[0] for d in decoded])
        if step % 2:
            images = images.flip(3)
        images = (images - MEAN.to(device)) / STD.to(device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets_all[index].to(device)

    return Run(args, taxonomy, device).images_per_s(batch(step) for step in range(args.warmup + args.steps))


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    # Leave cores to the process that drives the GPU: on a 16-core H100 box, 16 decode processes starved it
    # (2,824 img/s) while 10 or 13 kept the GPU fed (3,845 / 3,835 img/s).
    parser.add_argument("--workers", type=int, default=max(1, min(13, (os.cpu_count() or 4) - 3)))
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--stored-side", type=int, default=256, help="side of the pre-resized stored crops")
    # cpu-decode first: measured after the tensors mode in the same process it lost ~25% (2,738–2,967 vs
    # 3,796–3,845 img/s on an H100 box; the parent had already run CUDA work when the DataLoader forked)
    parser.add_argument("--modes", default="cpu-decode,gpu-decode,tensors")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.batch, args.steps, args.warmup = "tiny_cnn", 32, 8, 2, 1
        args.workers, args.images, args.stored_side = 0, 64, 48
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    taxonomy = Taxonomy.from_rows(DEMO_ROWS)
    modes = [m for m in args.modes.split(",") if m != "gpu-decode" or device.type == "cuda"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_shards(Path(tmp), args.images, args.stored_side)
        for mode in modes:
            if mode == "tensors":
                value = bench_tensors(args, taxonomy, device)
            elif mode == "cpu-decode":
                value = bench_cpu_decode(args, taxonomy, device, paths)
            else:
                value = bench_gpu_decode(args, taxonomy, device, paths)
            results.append((mode, value))
            print(f"{mode}: {value:,.0f} img/s", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n| device | model | input | batch | mode | train img/s | vs 3,773 anchor |\n|---|---|---|---|---|---|---|")
    for mode, value in results:
        print(f"| {name} | {args.model}-MTL | {args.size} | {args.batch} | {mode} | {value:,.0f} | "
              f"{value / 3773:.2f} |")
    return results


if __name__ == "__main__":
    main()
