"""Data benchmark: prepare throughput, and the input pipeline against a plain PIL loop over the same shards.

Not a test (pytest does not collect tests/bench). Measures, in one run on one machine:

* ``prepare`` — images/s of ``taxonet prepare`` (read, sha256, decode, resize to the max side, JPEG encode, shard)
  from a folder of camera-sized JPEGs, with one worker process and with all cores;
* ``pipeline`` — images/s per core of :func:`iter_parquet_batches` + :class:`Collator` (decode_image with its
  checks, the eval or train transform, label encoding, skip accounting), one thread;
* ``plain loop`` — the same shards read with ``pq.read_table`` and decoded with bare ``Image.open().convert()`` +
  the same transform + a label dict lookup: the floor the pipeline is compared with (target ratio ≥ 0.9);
* ``ray data`` (when Ray is installed and not ``--no-ray``) — ``read_split`` + ``iter_batches`` + Collator on a
  local Ray, for Ray's own overhead as a ratio.

Results (with command, machine and date) replace the "## Data" section of docs/benchmarks.md.

Usage:  .venv/bin/python tests/bench/bench_data.py [--images 400] [--repeats 3] [--no-ray] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))

from taxonet.data.dataset import DatasetInfo  # noqa: E402
from taxonet.data.pipeline import Collator, iter_parquet_batches  # noqa: E402
from taxonet.data.prepare import PrepareOptions, prepare_dataset  # noqa: E402
from taxonet.data.transforms import TransformSpec, build_eval_transform, build_train_transform  # noqa: E402
from taxonet.taxonomy import Taxonomy  # noqa: E402

BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
HEADING = "## Data"


def make_source(root: Path, n_images: int, size: tuple[int, int], seed: int = 0) -> None:
    """Camera-like JPEG crops (textured, blurred; quality 90) in ORDER/FAMILY/SPECIES folders of the demo tree."""
    from PIL import Image, ImageDraw, ImageFilter

    taxonomy = Taxonomy.demo()
    rng = np.random.default_rng(seed)
    chains = taxonomy.rows()
    for i in range(n_images):
        chain = chains[i % len(chains)]
        base = rng.integers(0, 255, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize(size, Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = int(rng.integers(size[1] // 20, size[1] // 5))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image = image.filter(ImageFilter.GaussianBlur(1.5))
        folder = root.joinpath(*chain)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def plain_loop(uri: str, split: str, batch_size: int, transform: Callable, taxonomy: Taxonomy) -> int:
    """The floor: pyarrow read, bare PIL decode, the same transform, a dict lookup for labels, torch.stack."""
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    info = DatasetInfo.load(uri)
    lookup = {tuple(taxonomy.decode(taxonomy.encode(row))): taxonomy.encode(row) for row in taxonomy.rows()}
    n = 0
    for shard_uri in info.shard_uris(split):
        table = pq.read_table(shard_uri, columns=["image", *taxonomy.ranks])
        images = table.column("image").to_pylist()
        labels = list(zip(*(table.column(r).to_pylist() for r in taxonomy.ranks)))
        for start in range(0, len(images), batch_size):
            tensors = [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[start:start + batch_size]]
            targets = torch.tensor([lookup[tuple(l)] for l in labels[start:start + batch_size]], dtype=torch.long)
            batch = torch.stack(tensors)
            assert len(targets) == len(batch)
            n += batch.shape[0]
    return n


def pipeline_loop(uri: str, split: str, batch_size: int, collator: Collator) -> int:
    n = 0
    for batch in iter_parquet_batches(uri, split, batch_size, seed=0):
        images, _ = collator(batch)
        n += images.shape[0]
    return n


def ray_loop(uri: str, split: str, batch_size: int, collator: Collator) -> int:
    from taxonet.data.ray_splits import read_split  # optional: Ray may be missing (--no-ray)

    n = 0
    for batch in read_split(uri, split).iter_batches(batch_size=batch_size, batch_format="numpy"):
        images, _ = collator(batch)
        n += images.shape[0]
    return n


def enlarge(uri: str, dst: Path, times: int) -> str:
    """The same dataset with every shard listed ``times`` times (file copies): an epoch long enough for Ray Data's
    fixed per-pass start-up (tasks, worker processes) to be amortised as in a real epoch."""
    from dataclasses import replace

    from taxonet.data.dataset import DATASET_JSON, ShardInfo

    info = DatasetInfo.load(uri)
    shards = []
    (dst / "shards").mkdir(parents=True)
    for copy in range(times):
        for shard in info.shards:
            path = shard.path.replace(".parquet", f"-copy{copy}.parquet")
            shutil.copyfile(Path(uri) / shard.path, dst / path)
            shards.append(ShardInfo(path=path, split=shard.split, rows=shard.rows, bytes=shard.bytes))

    def scaled(value):
        return {k: scaled(v) for k, v in value.items()} if isinstance(value, dict) else value * times

    big = replace(info, uri=str(dst), shards=tuple(shards), counts=scaled(info.counts))
    (dst / DATASET_JSON).write_text(big.to_json())
    return str(dst)


@dataclass
class Rate:
    """Images per wall-clock second and per CPU-second of this process (all its threads, not its children)."""

    wall: float
    cpu: float


def timed(run: Callable[[], int]) -> Rate:
    """Run once; CPU time makes a per-core rate that the other tenants of a shared machine barely disturb."""
    start, cpu_start = time.perf_counter(), time.process_time()
    n = run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Rate(wall=n / wall, cpu=n / max(cpu, 1e-9))


def median(rates: list[Rate]) -> Rate:
    return Rate(wall=statistics.median(r.wall for r in rates), cpu=statistics.median(r.cpu for r in rates))


def machine() -> str:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.machine()}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def write_section(text: str) -> None:
    """Replace (or add) the '## Data' section of docs/benchmarks.md; other sections are left alone."""
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    document = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    lines = document.splitlines()
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = text.rstrip("\n").splitlines() + [""]
    else:
        lines += ["", *text.rstrip("\n").splitlines()]
    BENCHMARKS_MD.write_text("\n".join(lines).rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="source images (default 400)")
    parser.add_argument("--source-size", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"))
    parser.add_argument("--max-side", type=int, default=256, help="prepare's max side (default 256)")
    parser.add_argument("--input-size", type=int, default=128, help="model input size (paper: 128)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the median is reported")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data measurement")
    parser.add_argument("--ray-repeat", type=int, default=10,
                        help="the Ray comparison reads the train shards this many times per pass (default 10)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # per-core numbers: one thread everywhere
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    scratch = Path(tempfile.mkdtemp(prefix="taxonet-bench-data-"))
    try:
        source = scratch / "source"
        make_source(source, args.images, tuple(args.source_size))
        taxonomy = Taxonomy.demo()
        cores = os.cpu_count() or 1

        prepare_rates: dict[int, Rate] = {}
        for workers in sorted({1, cores}):
            options = PrepareOptions(max_side=args.max_side, workers=workers, progress=False, val_fraction=0.0,
                                     test_fraction=0.0, shard_size=256)
            destination = str(scratch / f"ds-{workers}")
            prepare_rates[workers] = timed(lambda: prepare_dataset(str(source), destination, taxonomy=taxonomy,
                                                                   options=options).files_found)
        uri = str(scratch / f"ds-{cores}")

        spec = TransformSpec(input_size=args.input_size)
        rows = []
        for mode, transform in (("eval", build_eval_transform(spec)), ("train", build_train_transform(spec))):
            collator = Collator(taxonomy, spec, train=mode == "train")
            plain_rates, pipeline_rates = [], []
            pipeline_loop(uri, "train", args.batch, collator)  # warm-up: imports, page cache
            for repeat in range(args.repeats):  # interleaved, so machine noise hits both alike
                torch.manual_seed(repeat)  # the same augmentation draws for both
                plain_rates.append(timed(lambda: plain_loop(uri, "train", args.batch, transform, taxonomy)))
                torch.manual_seed(repeat)
                pipeline_rates.append(timed(lambda: pipeline_loop(uri, "train", args.batch, collator)))
            rows.append((mode, median(plain_rates), median(pipeline_rates)))
            assert collator.skipped == 0

        ray_row = None
        if not args.no_ray:
            try:
                import ray
                import ray.data
            except ImportError:
                ray = None
            if ray is not None:
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                big = enlarge(uri, scratch / "ds-big", args.ray_repeat)
                ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
                ray.data.DataContext.get_current().enable_progress_bars = False
                try:
                    collator = Collator(taxonomy, spec, train=False)
                    ray_loop(uri, "train", args.batch, collator)  # warm-up: worker processes, imports
                    ray_rates, plain_rates = [], []
                    for _ in range(args.repeats):
                        plain_rates.append(timed(lambda: plain_loop(big, "train", args.batch,
                                                                    build_eval_transform(spec), taxonomy)))
                        ray_rates.append(timed(lambda: ray_loop(big, "train", args.batch, collator)))
                    ray_row = ("eval", median(plain_rates), median(ray_rates))
                finally:
                    ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python tests/bench/bench_data.py " + " ".join(sys.argv[1:])
    lines = [
        HEADING,
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine()}; load average {load_before:.1f} at the start, {load_after:.1f} at the end",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- data: {args.images} JPEGs of {args.source_size[0]}×{args.source_size[1]} → prepared with max side "
        f"{args.max_side} → decoded and transformed to {args.input_size} px; batch {args.batch}; one torch thread; "
        f"median of {args.repeats} interleaved runs. A shared machine: compare ratios, not absolute numbers.",
        "",
        "| prepare | images/s (wall) | images per CPU-second |",
        "|---|---|---|",
        *(f"| {f'{w} worker processes' if w > 1 else 'in-process'} | {rate.wall:,.0f} "
          f"| {'(in the workers)' if w > 1 else f'{rate.cpu:,.0f}'} |" for w, rate in prepare_rates.items()),
        "",
        "Per core (one thread; images per CPU-second of the process, wall-clock rate in brackets):",
        "",
        "| transform | plain PIL loop | pipeline: iter_parquet_batches + Collator | ratio (target ≥ 0.9) |",
        "|---|---|---|---|",
        *(f"| {mode} | {plain.cpu:,.0f} ({plain.wall:,.0f}) | {pipe.cpu:,.0f} ({pipe.wall:,.0f}) "
          f"| {pipe.cpu / plain.cpu:.2f} |" for mode, plain, pipe in rows),
    ]
    if ray_row is not None:
        mode, plain, through_ray = ray_row
        lines += ["", f"Ray Data on a local Ray ({cores} CPUs), each pass over the train shards listed "
                  f"{args.ray_repeat} times (per-pass start-up amortised as in a real epoch). Wall-clock: the read "
                  f"tasks run in Ray's worker processes, whose CPU time this process cannot see.", "",
                  "| read_split + iter_batches + Collator | plain loop (img/s) | Ray Data (img/s) | ratio |",
                  "|---|---|---|---|",
                  f"| {mode} | {plain.wall:,.0f} | {through_ray.wall:,.0f} | {through_ray.wall / plain.wall:.2f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"updated {BENCHMARKS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
