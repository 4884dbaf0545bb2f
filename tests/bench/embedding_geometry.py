"""How the served embeddings group crops: cosines between pairs of synthetic crops, as the review page sees them.

For each training seed a quick model is trained on synthetic insects (``tests.support.quick_checkpoint``), then the
embeddings serving stores with queued crops (``Predictor.predict_batch(embed=True)``: pooled features, projected to
≤ 128 dims, unit norm) are computed for ``--images`` fresh images per demo species and three look-alikes of each
(flipped, brightened, re-framed: a trap camera's frames of one visitor). Pairs are sorted into: look-alikes (one
image and its variants), same species (different images), same family (other species), other order. Prints, per
kind, the mean cosine and the share of pairs at or above the review page's grouping threshold (0.9), mean ± SD over
seeds. Pure PyTorch, no Ray.

Usage:  .venv/bin/python tests/bench/embedding_geometry.py [--backbone small_cnn --size 40 --epochs 8
                                                            --seeds 0 1 2 --images 6]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from taxonet.data.synthetic import SyntheticInsects  # noqa: E402
from taxonet.review.store import DEFAULT_SIMILARITY  # noqa: E402
from taxonet.serve.predictor import Predictor  # noqa: E402
from taxonet.taxonomy import Taxonomy  # noqa: E402
from tests.serve.helpers import encode  # noqa: E402
from tests.support import quick_checkpoint  # noqa: E402

KINDS = ("look-alikes", "same species", "same family", "other order")


def look_alikes(image: Image.Image) -> list[Image.Image]:
    side = image.size[0]
    return [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ImageEnhance.Brightness(image).enhance(1.1),
            image.crop((2, 2, side - 2, side - 2)).resize((side, side))]


def pair_kinds(chains: list[tuple[str, ...]], originals: list[int]) -> np.ndarray:
    """Kind index per pair (i, j), -1 on the diagonal."""
    count = len(chains)
    kinds = np.full((count, count), -1)
    for i in range(count):
        for j in range(count):
            if i == j:
                continue
            if originals[i] == originals[j]:
                kinds[i, j] = 0
            elif chains[i] == chains[j]:
                kinds[i, j] = 1
            elif chains[i][:-1] == chains[j][:-1]:
                kinds[i, j] = 2
            elif chains[i][0] != chains[j][0]:
                kinds[i, j] = 3
    return kinds


def measure(seed: int, args: argparse.Namespace, directory: Path) -> dict[str, tuple[float, float]]:
    taxonomy = Taxonomy.demo()
    checkpoint = quick_checkpoint(directory / f"seed-{seed}", image_size=args.size, epochs=args.epochs, seed=seed,
                                  backbone=args.backbone)
    predictor = Predictor.from_checkpoint(str(checkpoint), device="cpu")
    generator = SyntheticInsects(taxonomy, image_size=64, seed=seed)
    images, chains, originals = [], [], []
    for number, sample in enumerate(generator.samples(args.images, start_index=20_000)):
        for image in [sample.image, *look_alikes(sample.image)]:
            images.append(image)
            chains.append(tuple(sample.labels))
            originals.append(number)
    batch = torch.stack([predictor.preprocessor.decode_uint8(encode(image, quality=90)) for image in images])
    embeddings = predictor.predict_batch(batch, embed=True).embeddings
    assert embeddings is not None
    vectors = embeddings.astype(np.float32)
    cosines = vectors @ vectors.T
    kinds = pair_kinds(chains, originals)
    threshold = DEFAULT_SIMILARITY
    return {kind: (float(cosines[kinds == index].mean()), float((cosines[kinds == index] >= threshold).mean()))
            for index, kind in enumerate(KINDS)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--size", type=int, default=40, help="model input px")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=6, help="fresh images per species (each with 3 look-alikes)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(seed, args, Path(tmp)) for seed in args.seeds]

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    print(f"date {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}; {args.backbone} at {args.size} px, {args.epochs} epochs "
          f"(tests.support.quick_checkpoint), seeds {args.seeds}, {args.images} images per species + 3 look-alikes "
          f"each")
    print(f"\n| pair of crops | mean cosine | share ≥ {DEFAULT_SIMILARITY} (grouped) |")
    print("|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {spread([r[kind][0] for r in results])} | {spread([r[kind][1] for r in results])} |")


if __name__ == "__main__":
    main()
