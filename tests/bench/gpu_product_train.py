"""GPU training throughput through the product's own path, next to the raw-PyTorch anchor measured in the same run.

For each case it (1) measures the anchor: the multitask model's train step in plain PyTorch on synthetic tensors
already on the device (bf16 autocast, channels_last, Adam, the paper loss) — the setting of the ENVIRONMENT.md anchor
table; then (2) runs the `taxonet train` verb itself (`taxonet.cli.main(["train", ...])`: Ray Train + Ray Data over
the Parquet shards of a prepared dataset + the product's worker, decode and augmentation included) on a local Ray
with one GPU worker, a fixed number of steps per epoch, and reads the per-epoch train images/s that the worker
reports (the history in `best/metrics.json`); epochs after the first are "after warm-up". It prints one Markdown table.

The dataset is the product's layout (`build_dataset`: JPEG shards + dataset.json) of synthetic insects rendered in
a process pool, stored at ``--stored-side`` (default: the input size, i.e. crops pre-resized to the training size).

Ray is not installed on the GPU box: bring it with tests/bench/gpu_pack_ray.sh (docs/benchmarks.md says how).

Each case runs once per ``--decode`` mode (``data.decode``): cpu = PIL decode + torchvision transforms in the
worker's loader threads (``train.loader_threads: auto`` = the worker's CPUs), gpu = one nvjpeg call per batch with
resize and augmentation on the GPU (taxonet.data.device_decode); the dataset is stored at the input size
(``prepare --train-size``) unless ``--stored-side`` says otherwise.

GPU:  PYTHONPATH=/tmp/raysite:platform:. python3 tests/bench/gpu_product_train.py
      (cases: r50-128 = ResNet50-MTL 128 px batch 512, r50-224 = 224 px batch 256, b3-128 = EfficientNet-B3-MTL
      128 px batch 256; --cases r50-128,b3-128 for a subset; --decode cpu,gpu)
CPU:  python tests/bench/gpu_product_train.py --smoke   (tiny model, 32 px, seconds of training; tested in CI)
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from taxonet.config import LossConfig, ModelConfig  # noqa: E402
from taxonet.data.prepare import PrepareOptions, SourceItem, build_dataset  # noqa: E402
from taxonet.losses import build_loss  # noqa: E402
from taxonet.models import build_model  # noqa: E402
from taxonet.taxonomy import Taxonomy  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    config: str  # packaged config the run starts from
    backbone: str
    size: int
    batch: int
    steps: int  # per epoch


CASES = {
    "r50-128": Case("ResNet50-MTL 128 px", "resnet50_mtl", "resnet50", 128, 512, 25),
    "r50-224": Case("ResNet50-MTL 224 px", "resnet50_mtl", "resnet50", 224, 256, 30),
    "b3-128": Case("EfficientNet-B3-MTL 128 px", "effnetb3_mtl", "efficientnet_b3", 128, 256, 30),
    "smoke": Case("tiny_cnn 32 px (smoke)", "demo", "tiny_cnn", 32, 8, 3),
}


# ------------------------------------------------------------------------------------------------ dataset
def _render(args: tuple[int, int, tuple[str, ...]]) -> SourceItem:
    from taxonet.data.synthetic import SyntheticInsects

    side, index, chain = args
    generator = _render.generators.get(side) if hasattr(_render, "generators") else None
    if generator is None:  # one generator per process and side (it caches class appearances)
        _render.generators = getattr(_render, "generators", {})
        generator = _render.generators[side] = SyntheticInsects(Taxonomy.demo(), image_size=side, seed=0)
    buffer = io.BytesIO()
    generator.render(chain, index).save(buffer, format="PNG")  # the JPEG encode happens in build_dataset
    return SourceItem(origin=f"synthetic:{'/'.join(chain)}/{index}", labels=tuple(chain), source="synthetic",
                      data=buffer.getvalue())


def make_dataset(directory: Path, side: int, train_rows: int, processes: int) -> str:
    """A prepared dataset with at least ``train_rows`` training rows (80 % of the total), crops of ``side`` px."""
    from taxonet.data.synthetic import SyntheticInsects

    taxonomy = Taxonomy.demo()
    chains = SyntheticInsects(taxonomy, image_size=min(max(side, 32), 512), seed=0).chains
    total = int(train_rows / 0.8) + 4 * len(chains)
    jobs = [(min(max(side, 32), 512), i, tuple(chains[i % len(chains)])) for i in range(total)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        items = pool.map(_render, jobs, chunksize=64)
    uri = str(directory / f"ds-{side}")
    build_dataset(items, uri, taxonomy, PrepareOptions(max_side=side, train_size=side, shard_size=2000,
                                                        workers=processes, progress=False),
                  source_description=f"synthetic, {total} crops of {side} px (gpu_product_train.py)")
    print(f"dataset: {total} crops of {side} px in {time.perf_counter() - started:.0f} s -> {uri}", flush=True)
    return uri


# ------------------------------------------------------------------------------------------------ anchor
def anchor(case: Case, device: torch.device, steps: int, warmup: int) -> float:
    """Train img/s of the model's step on synthetic tensors (the ENVIRONMENT.md anchor's setting)."""
    taxonomy = Taxonomy.demo()
    model = build_model(ModelConfig(backbone=case.backbone, weights=None), taxonomy).to(device)
    loss_fn = build_loss(LossConfig(), taxonomy).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(case.batch, 3, case.size, case.size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    chains = taxonomy.rows()
    targets = torch.tensor([taxonomy.encode(chains[i % len(chains)]) for i in range(case.batch)], device=device)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(images)
        loss = loss_fn({k: v.float() for k, v in logits.items()}, targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    rate = steps * case.batch / (time.perf_counter() - started)
    del model, optimizer, images
    if cuda:
        torch.cuda.empty_cache()
    return rate


# ------------------------------------------------------------------------------------------------ product run
def product_run(case: Case, dataset: str, storage: str, epochs: int, cpus: float, loader_threads: int | str,
                use_gpu: bool, augment: bool | None, decode: str = "cpu") -> list[dict]:
    """`taxonet train` (the CLI verb, in this process, on the Ray started by main); returns the run's history."""
    from taxonet import cli

    run = f"bench-{case.backbone}-{case.size}-{decode}-{int(time.time())}"
    sets = {
        "model.backbone": case.backbone, "model.weights": "null", "data.dataset": dataset,
        "data.input_size": case.size, "optim.batch_size": case.batch, "optim.epochs": epochs,
        "train.max_steps_per_epoch": case.steps, "train.storage": storage, "train.run_name": run,
        "train.num_workers": 1, "train.use_gpu": str(use_gpu).lower(), "train.cpus_per_worker": cpus,
        "train.loader_threads": loader_threads, "train.max_failures": 0, "data.decode": decode,
    }
    if augment is not None:
        sets["data.augment"] = str(augment).lower()
    argv = ["train", "--config", case.config, *(f"--set={k}={v}" for k, v in sets.items())]
    started = time.perf_counter()
    rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"taxonet train exited with {rc}")
    # the run's history rides in the best checkpoint's metrics (train/loop.py: complete_checkpoint)
    history = json.loads((Path(storage) / run / "best" / "metrics.json").read_text())["history"]
    print(f"{case.name}: taxonet train finished in {time.perf_counter() - started:.0f} s "
          f"(Ray Train start, {epochs} epochs with validation and checkpoints, thresholds)", flush=True)
    return history


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="r50-128,r50-224,b3-128", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    parser.add_argument("--anchor-steps", type=int, default=20)
    parser.add_argument("--stored-side", type=int, default=0, help="stored crop side (default: the input size)")
    parser.add_argument("--cpus", type=float, default=0, help="CPUs of the worker (default: all but 2)")
    parser.add_argument("--loader-threads", default="auto",
                        help="train.loader_threads for the cpu decode: a number or auto (default: auto = the "
                             "worker's CPUs)")
    parser.add_argument("--decode", default="cpu,gpu",
                        help="comma list of data.decode modes to run each case with (default: cpu,gpu; on a CPU "
                             "machine gpu runs the same device code on the CPU)")
    parser.add_argument("--augment", choices=("config", "true", "false"), default="config")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds: checks the plumbing only")
    parser.add_argument("--out", default="", help="also write the table and raw results here (JSON + Markdown)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    cases = [CASES["smoke"]] if args.smoke else [CASES[name] for name in args.cases.split(",")]
    epochs = 2 if args.smoke else args.epochs
    cores = os.cpu_count() or 2
    cpus = args.cpus or (max(1.0, cores - 2.0) if not args.smoke else 1.0)
    processes = max(1, min(cores - 1, 14))
    augment = None if args.augment == "config" else args.augment == "true"

    import ray  # after the anchors' imports: the pure-PyTorch part runs even where the bundle is broken

    header = (f"- date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"{torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()}; "
              f"{cores} cores; Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")
    print(header, flush=True)
    work = Path(tempfile.mkdtemp(prefix="taxonet-gpu-product-"))
    datasets: dict[int, str] = {}
    results = []
    ray_started = False
    try:
        for case in cases:
            rate = anchor(case, device, steps=3 if args.smoke else args.anchor_steps, warmup=1 if args.smoke else 5)
            print(f"{case.name}: anchor {rate:,.0f} img/s", flush=True)
            side = args.stored_side or case.size
            if side not in datasets:
                datasets[side] = make_dataset(work, side, case.batch * case.steps, processes)
            if not ray_started:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                # address="local": a Ray of its own, never a cluster started on the machine with `ray start`
                ray.init(address="local", num_cpus=int(cores) if not args.smoke else 2, num_gpus=1 if cuda else 0,
                         include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
                ray_started = True
            threads: int | str = args.loader_threads if args.loader_threads == "auto" else int(args.loader_threads)
            for decode in args.decode.split(","):
                try:
                    history = product_run(case, datasets[side], str(work / "runs"), epochs, cpus,
                                          1 if args.smoke else threads, cuda, augment, decode)
                except Exception as exc:  # one failing mode must not cost the other cases their numbers
                    print(f"{case.name}, decode {decode}: FAILED ({type(exc).__name__}: {exc})", flush=True)
                    continue
                after = [h for h in history if h["epoch"] >= 1]
                per_epoch = [round(h["images_per_s"], 1) for h in history]
                mean_after = statistics.mean(h["images_per_s"] for h in after) if after else float("nan")
                results.append({"case": case.name, "decode": decode, "batch": case.batch, "stored_side": side,
                                "anchor": rate, "per_epoch": per_epoch, "after_warmup": mean_after,
                                "ratio": mean_after / rate,
                                "first_batch_s": [round(h.get("first_batch_s", float("nan")), 2) for h in history],
                                "steps": case.steps})
                write_results(header, results, args.out)
    finally:
        if ray_started:
            ray.shutdown()
    print(write_results(header, results, args.out))


def write_results(header: str, results: list[dict], out: str) -> str:
    """The Markdown table of ``results``; also written (with the raw JSON) under ``out`` when given — after every
    run, so that a run stopped by its time limit leaves the cases it finished."""
    lines = [header, "",
             "| case | decode | batch | stored px | anchor img/s (tensors) | taxonet train img/s per epoch | "
             "after warm-up | ratio | first batch s per epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['decode']} | {r['batch']} | {r['stored_side']} | {r['anchor']:,.0f} | "
                     f"{' / '.join(f'{v:,.0f}' for v in r['per_epoch'])} | {r['after_warmup']:,.0f} | "
                     f"{r['ratio']:.2f} | {' / '.join(str(v) for v in r['first_batch_s'])} |")
    table = "\n".join(lines)
    if out:
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "gpu_product_train.md").write_text(table + "\n")
        (directory / "gpu_product_train.json").write_text(json.dumps(results, indent=2))
    return table

if __name__ == "__main__":
    main()
