"""Ray Train throughput against the plain PyTorch loop on the same data, model and batch — one run, side by side.

    .venv/bin/python tests/bench/bench_train.py [--epochs 3] [--per-species 120] [--size 48] [--backbone small_cnn]

Measures (a) the product's loop without Ray (``taxonet.train.loop.fit`` over ``iter_parquet_batches`` → ``Collator``)
in this process, (b) Ray Train with 1 worker, (c) Ray Train with 2 workers — the same ``fit`` inside Ray Train's
workers — all on one local Parquet dataset. Steady-state images/s
come from each epoch after the first (warm-up); wall time includes Ray's start-up. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

import ray  # noqa: E402
import torch  # noqa: E402

from taxonet.config import load_config  # noqa: E402
from taxonet.data.pipeline import Collator, iter_parquet_batches  # noqa: E402
from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset  # noqa: E402
from taxonet.data.transforms import TransformSpec  # noqa: E402
from taxonet.taxonomy import Taxonomy  # noqa: E402
from taxonet.train.driver import run_training  # noqa: E402
from taxonet.train.loop import fit  # noqa: E402


class ParquetData:
    """The loop's EpochData over the prepared dataset, read with pyarrow in this process (no Ray)."""

    def __init__(self, config, taxonomy) -> None:
        spec = TransformSpec.from_config(config.data)
        self.config = config
        self.train_collate = Collator(taxonomy, spec, train=config.data.augment)
        self.eval_collate = Collator(taxonomy, spec, train=False)

    def train(self, epoch: int):
        return (self.train_collate(b) for b in iter_parquet_batches(
            self.config.data.dataset, "train", self.config.optim.batch_size, shuffle=True, seed=epoch))

    def val(self, epoch: int):
        return (self.eval_collate(b) for b in iter_parquet_batches(
            self.config.data.dataset, "val", self.config.optim.batch_size, shuffle=False))

    def skipped_records(self) -> int:
        return self.train_collate.skipped + self.eval_collate.skipped


def plain_loop(config, taxonomy, epochs: int) -> tuple[list[float], float]:
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    # the worker's loop without Ray: every epoch also validates, as in Ray Train; the checkpoints are not written
    config = config.with_overrides({"optim.epochs": epochs, "train.amp": False, "train.channels_last": False})
    start = time.perf_counter()
    history = fit(config, taxonomy, ParquetData(config, taxonomy), lambda metrics, checkpoint: None,
                  device=torch.device("cpu"))
    return [(h["images_per_s"], h["first_batch_s"], h["train_images"], h["train_seconds"]) for h in history], \
        time.perf_counter() - start


def ray_train(config, workers: int) -> tuple[list[float], float]:
    config = config.with_overrides({"train.num_workers": workers,
                                    # 1 CPU (one torch thread) per worker, as the plain loop; 2 workers share 2 cores
                                    "train.cpus_per_worker": 1.0 if workers == 1 else 0.5,
                                    "train.run_name": f"bench-{workers}w-{time.time_ns()}"})
    start = time.perf_counter()
    result = run_training(config)
    return [(h["images_per_s"], h["first_batch_s"], h["train_images"], h["train_seconds"]) for h in result.history], \
        time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-species", type=int, default=120)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbone", default="small_cnn")
    args = parser.parse_args()

    taxonomy = Taxonomy.demo()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = str(Path(tmp) / "ds")
        write_synthetic_dataset(dataset, taxonomy, per_species=args.per_species, image_size=args.size,
                                options=PrepareOptions(workers=1, progress=False))
        config = load_config("demo", {
            "data.dataset": dataset, "data.input_size": args.size, "optim.epochs": args.epochs,
            "optim.batch_size": args.batch, "model.backbone": args.backbone, "train.storage": str(Path(tmp) / "runs"),
            "train.cpus_per_worker": 1, "train.max_failures": 0,
        })
        rows = []
        plain, plain_wall = plain_loop(config, taxonomy, args.epochs)
        rows.append(("plain PyTorch loop", plain, plain_wall, 1))
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            for workers in (1, 2):
                speeds, wall = ray_train(config, workers)
                rows.append((f"Ray Train, {workers} worker{'s' if workers > 1 else ''}", speeds, wall, workers))
        finally:
            ray.shutdown()
    def steady(speeds):  # epochs after the first (warm-up): images/s as the loop saw them
        return statistics.mean(v[0] for v in (speeds[1:] or speeds))

    def without_start(speeds, workers=1):  # the same, leaving out the wait for each epoch's first batch
        kept = speeds[1:] or speeds  # (rank 0's images and seconds: times the number of workers)
        return workers * sum(v[2] for v in kept) / sum(v[3] - v[1] for v in kept)

    base, one = steady(plain), steady(rows[1][1])
    base_run, one_run = without_start(plain), without_start(rows[1][1])
    print(f"\n{args.backbone}, {args.size} px, batch {args.batch}/worker, {args.per_species} img/species "
          f"({rows[0][1][0][2]} train images per epoch), {args.epochs} epochs, {os.cpu_count()} cores\n")
    print("| setup | img/s (epochs 2+) | vs plain | vs Ray 1 worker | first batch s | img/s after first batch | "
          "vs plain | wall s (incl. start-up) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, speeds, wall, workers in rows:
        kept = speeds[1:] or speeds
        print(f"| {name} | {steady(speeds):.1f} | {steady(speeds) / base:.2f} | {steady(speeds) / one:.2f} | "
              f"{statistics.mean(v[1] for v in kept):.2f} | {without_start(speeds, workers):.1f} | "
              f"{without_start(speeds, workers) / base_run:.2f} | {wall:.1f} |")

if __name__ == "__main__":
    main()
