"""Serving overhead on the CPU: HTTP throughput and latency through Ray Serve vs the in-process predictor.

One run, one machine: builds (or takes) a checkpoint, measures the in-process :class:`taxonet.serve.predictor.Predictor`
on encoded JPEGs at ``--batch-size`` (decode + eval transform + batched forward + answers, one thread — what one
replica does), then deploys ``taxonet.serve.app:app_builder`` on an embedded local Ray with the same
``max_batch_size`` and drives ``POST /v1/classify`` from ``--concurrency`` loopback clients (one image per request,
keep-alive connections), measuring the in-process baseline again after each level (while Serve idles). Prints img/s,
p50/p99 latency per concurrency and its ratio to the mean of the baselines measured just before and just after it
(target ≥ 0.8), as a Markdown table for docs/benchmarks.md. For scale it also
measures a no-op app with the same two hops (FastAPI ingress → batched deployment): Serve's own request rate on
this machine, which bounds what any model can reach through HTTP.

Usage:  .venv/bin/python tests/bench/bench_serve.py [--backbone resnet18 --size 128 --batch-size 8
                                                     --concurrency 1,4,8,16 --seconds 15]

GPU mode (``--device cuda``): the classifier deployment holds the GPU (num_gpus 1) and the in-process predictor
runs on it too; ``--ingress-replicas auto`` scales the CPU ingress (HTTP, validation, JPEG decode and resize) to the
cores left beside the classifier and the load generator. The same flags run on a CPU (``--device cpu``, the default)
for a smoke test; ``--json PATH`` writes the results for a test to read.

The load generator runs on the same cores as Serve; on a small machine it takes a share of the CPU the server
would otherwise have, so the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))


def make_checkpoint(directory: Path, backbone: str, size: int) -> Path:
    """A random-init multitask model with plausible anomaly thresholds: serving cost does not depend on training."""
    import torch

    from taxonet.checkpoint import save_checkpoint
    from taxonet.config import load_config
    from taxonet.data.transforms import TransformSpec
    from taxonet.models import build_model
    from taxonet.taxonomy import Taxonomy

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_predictor import random_thresholds

    torch.manual_seed(0)
    taxonomy = Taxonomy.demo()
    config = load_config("demo", {"name": "bench", "model.backbone": backbone, "model.weights": None,
                                  "data.input_size": size})
    model = build_model(config.model, taxonomy)
    return save_checkpoint(directory / "ckpt", model, taxonomy, config, TransformSpec.from_config(config.data),
                           thresholds=random_thresholds(taxonomy), version="bench")


def synthetic_jpegs(count: int, side: int) -> list[bytes]:
    import io

    from taxonet.data.synthetic import SyntheticInsects
    from taxonet.taxonomy import Taxonomy

    generator = SyntheticInsects(Taxonomy.demo(), image_size=side, seed=1)
    out = []
    for sample in generator.samples(max(1, count // 9 + 1)):
        buffer = io.BytesIO()
        sample.image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out[:count]


def load_predictor(checkpoint: Path, threads: int, graph: bool = True, device: str = "cpu") -> Any:
    """The in-process predictor, loaded (and frozen into a graph) once per run, on ``threads`` torch threads."""
    import torch

    from taxonet.serve.predictor import Predictor

    torch.set_num_threads(threads)
    return Predictor.from_checkpoint(str(checkpoint), device=device, graph=graph)


def ingress_replicas(setting: str, cpus: int, classifier_cpus: int) -> int:
    """``--ingress-replicas``: a number, or "auto" = half of the cores the classifier leaves (the other half runs the
    proxy and the load generator on this machine), at least 1."""
    if setting == "auto":
        return max(1, (cpus - classifier_cpus) // 2)
    return max(1, int(setting))


def in_process(predictor: Any, jpegs: list[bytes], batch_size: int, seconds: float) -> float:
    """img/s of the in-process predictor: bytes → answers, ``batch_size`` images per forward pass."""
    predictor.predict_bytes(jpegs[:batch_size], batch_size=batch_size)  # warm-up
    done, start, step = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        chunk = [jpegs[(step * batch_size + i) % len(jpegs)] for i in range(batch_size)]
        predictor.predict_bytes(chunk, batch_size=batch_size)
        done += batch_size
        step += 1
    return done / (time.perf_counter() - start)


_BOUNDARY = "taxonet-bench-boundary"


def multipart_bodies(jpegs: list[bytes], per_request: int) -> list[bytes]:
    """``multipart/form-data`` bodies of ``per_request`` JPEGs each (parts named ``files``), cycling through
    ``jpegs``: what a camera's uploader sends when it posts its crops in groups."""
    bodies = []
    for start in range(0, len(jpegs), per_request):
        parts = []
        for offset in range(per_request):
            data = jpegs[(start + offset) % len(jpegs)]
            parts.append(f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; "
                         f"filename=\"{start + offset}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".encode() + data
                         + b"\r\n")
        bodies.append(b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode())
    return bodies


def http_load(port: int, path: str, jpegs: list[bytes], concurrency: int, seconds: float,
              per_request: int = 1) -> dict[str, Any]:
    """``concurrency`` keep-alive clients posting ``per_request`` JPEGs per request (one as the raw body, several as
    multipart) for ``seconds``; latencies of 200s only, per request; ``img_per_s`` counts images."""
    bodies = jpegs if per_request == 1 else multipart_bodies(jpegs, per_request)
    content_type = "image/jpeg" if per_request == 1 else f"multipart/form-data; boundary={_BOUNDARY}"
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(seed: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, bad, index = [], [], seed
        while time.perf_counter() < deadline:
            body = bodies[index % len(bodies)]
            index += concurrency
            start = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers={"content-type": content_type})
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    mine.append(time.perf_counter() - start)
                else:
                    bad.append(str(response.status))
            except (OSError, http.client.HTTPException) as exc:
                bad.append(type(exc).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if not latencies:
        return {"img_per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "requests": 0, "errors": errors}
    return {"img_per_s": len(latencies) * per_request / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)), "requests": len(latencies), "errors": errors}


def build_floor_app() -> Any:
    """Serve's own cost on this machine: the same two hops (HTTP ingress → batched deployment) doing nothing."""
    from ray import serve

    @serve.deployment(name="FloorModel", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class FloorModel:
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def run(self, items: list[Any]) -> list[dict[str, int]]:
            return [{"ok": 1} for _ in items]

        async def classify(self, item: Any) -> dict[str, int]:
            return await self.run(item)

    @serve.deployment(name="FloorIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class FloorIngress:
        def __init__(self, model: Any) -> None:
            self.model = model

        async def __call__(self, request: Any) -> dict[str, int]:  # a starlette Request; the dict goes out as JSON
            await request.body()
            return await self.model.classify.remote(np.zeros((3, 8, 8), np.float32))

    return FloorIngress.bind(FloorModel.bind())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint to serve (default: a random-init model)")
    parser.add_argument("--backbone", default="resnet18", help="for the default checkpoint (default: resnet18)")
    parser.add_argument("--size", type=int, default=128, help="for the default checkpoint: input px (default: 128)")
    parser.add_argument("--image-side", type=int, default=128, help="side of the JPEGs sent (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.005,
                        help="Serve's batch_wait_timeout_s: how long a batch waits to fill (default: 0.005)")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="JPEGs per request: 1 = raw body (default), more = one multipart request of that many "
                             "(an uploader posting its crops in groups); Serve still batches them per image")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process predictor = CPUs (and so OMP threads) of the "
                             "classifier replica (default: 1; on a small shared machine more threads oversubscribe)")
    parser.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                        help="run the model as a frozen TorchScript graph on both sides (the default; --no-graph: "
                             "the eager model on both sides)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the embedded Ray")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the classifier and the in-process predictor run (cuda: one GPU, num_gpus 1)")
    parser.add_argument("--ingress-replicas", default="1",
                        help="ingress replicas: a number or auto = half the cores beside the classifier (default 1)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from taxonet.serve.app import app_builder

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), args.backbone,
                                                                                   args.size)
        jpegs = synthetic_jpegs(64, args.image_side)
        predictor = load_predictor(checkpoint, args.threads, args.graph, args.device)
        replicas = ingress_replicas(args.ingress_replicas, args.num_cpus, args.threads)
        before = in_process(predictor, jpegs, args.batch_size, args.seconds)
        print(f"in-process predictor, batch {args.batch_size}: {before:,.1f} img/s", flush=True)

        ray.init(num_cpus=args.num_cpus, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False, _node_ip_address="127.0.0.1")
        with socket.socket() as sock:  # a free loopback port for Serve's proxy
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # the classifier gets as many CPUs as the in-process predictor has threads (Ray sets its OMP_NUM_THREADS
        # from num_cpus); the ingress and the proxy share the rest with the load generator
        serve.run(app_builder({
            "checkpoint": str(checkpoint), "device": args.device, "graph": args.graph,
            "max_batch_size": args.batch_size, "batch_wait_timeout_s": args.batch_wait_s,
            "ingress": {"num_cpus": 0, "autoscaling": None, "num_replicas": replicas},
            "classifier": {"num_cpus": args.threads, "num_gpus": 1 if args.device == "cuda" else 0,
                           "autoscaling": None, "num_replicas": 1,
                           "max_ongoing_requests": max(64, 2 * args.batch_size)},
        }), name="bench", route_prefix="/")
        if not 1 <= args.images_per_request <= 32:
            parser.error("--images-per-request must be in 1..32 (the app's default max_files)")
        http_load(port, "/v1/classify", jpegs, 4, 3.0, args.images_per_request)  # warm-up
        rows, baselines = [], [before]
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            result = http_load(port, "/v1/classify", jpegs, concurrency, args.seconds, args.images_per_request)
            # the in-process baseline again after each level, so that each ratio compares measurements taken
            # minutes apart at most (this machine's speed drifts by up to ±12 % between two of them)
            baselines.append(in_process(predictor, jpegs, args.batch_size, args.seconds))
            result["baseline"] = (baselines[-2] + baselines[-1]) / 2
            rows.append((concurrency, result))
            print(f"HTTP concurrency {concurrency:>3}: {result['img_per_s']:,.1f} img/s  p50 {result['p50_ms']:.1f} ms"
                  f"  p99 {result['p99_ms']:.1f} ms  ({result['requests']} requests, "
                  f"{len(result['errors'])} errors); in-process after it {baselines[-1]:,.1f} img/s", flush=True)
        serve.delete("bench")
        serve.run(build_floor_app(), name="floor", route_prefix="/floor")
        http_load(port, "/floor", jpegs, 4, 3.0)
        floors = {c: http_load(port, "/floor", jpegs, c, min(args.seconds, 8.0))["img_per_s"] for c, _ in rows}
        serve.shutdown()
        ray.shutdown()

    baseline = statistics.mean(baselines)
    best = max(result["img_per_s"] / result["baseline"] for _, result in rows)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; load average "
          f"{os.getloadavg()[0]:.1f}; {args.backbone} at {args.size} px, JPEGs of {args.image_side} px, "
          f"batch {args.batch_size} (Serve waits up to {args.batch_wait_s * 1000:g} ms to fill one), "
          f"{args.threads} torch thread(s), {args.images_per_request} image(s) per request, "
          f"{'TorchScript graph' if args.graph else 'eager model'}; device {args.device}"
          + (f" ({torch_device_name()})" if args.device == "cuda" else "") + f"; {replicas} ingress replica(s)")
    print(f"in-process predictor: {baseline:,.1f} img/s mean (measured before the first level and after each: "
          f"{', '.join(f'{b:,.1f}' for b in baselines)})\n")
    print("| clients | HTTP img/s | p50 ms per request | p99 ms | errors | in-process img/s around it | ratio to "
          "in-process | no-op Serve app req/s |\n|---|---|---|---|---|---|---|---|")
    for concurrency, result in rows:
        print(f"| {concurrency} | {result['img_per_s']:,.1f} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f} | "
              f"{len(result['errors'])} | {result['baseline']:,.1f} | {result['img_per_s'] / result['baseline']:.2f} | "
              f"{floors[concurrency]:,.1f} |")
    print(f"\nbest HTTP / in-process = {best:.2f} (target ≥ 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": args.device, "ingress_replicas": replicas, "baselines": baselines, "best_ratio": best,
            "rows": [{"clients": c, "img_per_s": r["img_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                      "errors": len(r["errors"]), "baseline": r["baseline"], "floor_req_per_s": floors[c]}
                     for c, r in rows]}, indent=2))


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
