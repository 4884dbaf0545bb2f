"""Why the CPU classifier runs a TorchScript graph: the forward pass and a busy Python thread in the same process.

A Serve replica is one process: its request handling (Ray's task plumbing, Serve's router probes, metrics) runs in
Python threads beside the thread that runs the model. An eager PyTorch forward pass returns to Python between every
op and must take the GIL back each time; when another thread holds it, the forward waits (up to the interpreter's
switch interval per hand-over). A frozen TorchScript graph (``taxonet.serve.predictor.freeze_for_cpu``) runs op to op in
C++ and releases the GIL for the whole pass.

Measures ms per image of a batched forward pass (one torch thread), eager vs graph, while another thread of the same
process is (a) absent, (b) doing short bursts of Python work (≈ what a replica's request handling does under load),
(c) running Python without pause (the worst case). Prints a Markdown table for docs/benchmarks.md.

Usage:  .venv/bin/python tests/bench/bench_gil.py [--backbone resnet50 --size 128 --batch-size 8 --repeats 8]
        --smoke: small_cnn at 32 px, a few passes (run by tests/serve/test_bench_smoke.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

#: name → (Python work per burst: iterations of sum(range(1000)), pause between bursts in s); None: no other thread
LOADS = {"alone": None, "bursts (0.3 ms work / 1 ms pause)": (20, 0.001), "busy (no pause)": (200, 0.0)}


def _other_thread(stop: threading.Event, work: int, pause: float) -> None:
    while not stop.is_set():
        for _ in range(work):
            sum(range(1000))
        if pause:
            time.sleep(pause)


def forward_ms(model, batch, repeats: int, load: tuple[int, float] | None) -> float:
    """Median ms per image of ``repeats`` forward passes, with the given load on another thread."""
    import torch

    stop = threading.Event()
    other = threading.Thread(target=_other_thread, args=(stop, *load), daemon=True) if load else None
    if other:
        other.start()
        time.sleep(0.05)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                model(batch)
                times.append((time.perf_counter() - start) / len(batch) * 1000)
    finally:
        stop.set()
        if other:
            other.join()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8, help="forward passes per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="times each measurement is repeated (interleaved)")
    parser.add_argument("--smoke", action="store_true", help="small_cnn at 32 px, 2 passes, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.size, args.repeats, args.rounds = "small_cnn", 32, 2, 1

    import torch

    from taxonet.config import load_config
    from taxonet.models import build_model
    from taxonet.serve.predictor import freeze_for_cpu
    from taxonet.taxonomy import Taxonomy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config("demo", {"name": "bench", "model.backbone": args.backbone, "model.weights": None,
                                  "data.input_size": args.size})
    eager = build_model(config.model, Taxonomy.demo()).eval()
    graph = freeze_for_cpu(eager, args.size)
    if graph is None:
        raise SystemExit(f"{args.backbone} could not be frozen into a graph (see the warning above)")
    models = {"eager": eager, "graph": graph}
    batch = torch.rand(args.batch_size, 3, args.size, args.size)
    for model in models.values():  # warm-up (the graph executor optimises on its first calls)
        forward_ms(model, batch, 3, None)
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for load_name, load in LOADS.items():
            for name, model in models.items():
                results.setdefault((name, load_name), []).append(forward_ms(model, batch, args.repeats, load))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, torch {torch.__version__}; "
          f"{args.backbone} at {args.size} px, batch {args.batch_size}, 1 torch thread, median of {args.repeats} "
          f"passes, {args.rounds} interleaved round(s)\n")
    print("| other thread of the process | eager ms/img | graph ms/img | eager / graph |\n|---|---|---|---|")
    for load_name in LOADS:
        eager_ms = statistics.median(results[("eager", load_name)])
        graph_ms = statistics.median(results[("graph", load_name)])
        print(f"| {load_name} | {eager_ms:.1f} | {graph_ms:.1f} | {eager_ms / graph_ms:.2f} |")


if __name__ == "__main__":
    main()
