"""What the review queue costs serving: HTTP throughput with queueing on vs off, 32 clients, ratio in one run.

Two copies of ``taxonet.serve.app:app_builder`` run side by side on one embedded local Ray, the same checkpoint,
one replica each: ``off`` (no ``review_queue``) and ``on`` (``review_queue`` writing batches to a local directory,
``audit_rate`` 1.0 by default, so that *every* answer is queued — the worst case; in service only unsure answers
and a small audit share are). ``--clients`` keep-alive loopback clients post one JPEG per request to one app at a
time, alternating off/on for ``--rounds`` rounds of ``--seconds`` each, so both see the same machine drift. Prints
img/s per round, the crops written and dropped, and the ratio on/off of the summed throughputs (target ≥ 0.95).

Usage:  .venv/bin/python tests/bench/bench_review_queue.py [--clients 32 --rounds 3 --seconds 15
                                                            --audit-rate 1.0 --backbone small_cnn --size 64]

The load generator shares the cores with Serve; the queue's writer thread runs inside the ingress replica.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import http_load, make_checkpoint, synthetic_jpegs  # noqa: E402


def app_args(checkpoint: Path, queue: str | None, audit_rate: float, batch_size: int) -> dict:
    args = {"checkpoint": str(checkpoint), "device": "cpu", "max_batch_size": batch_size,
            # admit all the clients' requests (the default admits 8 per ingress replica and answers the rest 503)
            "max_concurrent_requests": 64,
            "ingress": {"num_cpus": 0, "autoscaling": None, "num_replicas": 1},
            "classifier": {"num_cpus": 1, "autoscaling": None, "num_replicas": 1, "access_log": False}}
    if queue is not None:
        args["review_queue"] = {"uri": queue, "audit_rate": audit_rate}
    return args


def queued_rows(queue: str) -> int:
    from taxonet.review import records

    try:
        return sum(len(records.read_queue_batch(queue, batch)) for batch in records.list_queue_batches(queue))
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs (default 3)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--audit-rate", type=float, default=1.0,
                        help="share of sure answers queued (default 1.0: every answer is queued)")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--size", type=int, default=64, help="model input px")
    parser.add_argument("--image-side", type=int, default=128, help="side of the JPEGs sent")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the embedded Ray")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from taxonet.serve.app import app_builder

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), args.backbone, args.size)
        # every request a different crop (bytes after the JPEG's end marker are ignored by decoders but change its
        # hash): the writer dedups repeated bytes, and the worst case re-encodes and writes every one
        jpegs = [data + index.to_bytes(4, "big") for index, data in
                 enumerate(synthetic_jpegs(256, args.image_side) * 64)]
        queue = str(Path(tmp) / "queue")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder(app_args(checkpoint, None, args.audit_rate, args.batch_size)), name="off",
                  route_prefix="/off")
        serve.run(app_builder(app_args(checkpoint, queue, args.audit_rate, args.batch_size)), name="on",
                  route_prefix="/on")
        for prefix in ("/off", "/on"):
            http_load(port, f"{prefix}/v1/classify", jpegs, 4, 3.0)  # warm-up
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for round_number in range(args.rounds):
            for name in ("off", "on"):
                shift = round_number * len(jpegs) // max(1, args.rounds)  # no crop sent twice to 'on'
                result = http_load(port, f"/{name}/v1/classify", jpegs[shift:] + jpegs[:shift], args.clients,
                                   args.seconds)
                results[name].append(result)
                print(f"round {round_number + 1} {name:>3}: {result['img_per_s']:,.1f} img/s  p50 "
                      f"{result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms  ({result['requests']} requests, "
                      f"{len(result['errors'])} errors)", flush=True)
        requests_on = sum(r["requests"] for r in results["on"]) + 4  # + the warm-up's few
        serve.delete("on")  # the ingress closes its writer: what was waiting is written
        written = queued_rows(queue)
        serve.shutdown()
        ray.shutdown()

    off = sum(r["img_per_s"] for r in results["off"])
    on = sum(r["img_per_s"] for r in results["on"])
    ratio = on / off if off else float("nan")
    print(f"\ndate {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}; load average {os.getloadavg()[0]:.1f}; {args.backbone} at {args.size} px, JPEGs "
          f"of {args.image_side} px, batch {args.batch_size}, {args.clients} clients, {args.rounds} rounds of "
          f"{args.seconds:g} s, audit_rate {args.audit_rate}")
    print("\n| queueing | img/s per round | mean img/s | p50 ms (mean) | p99 ms (mean) | errors |")
    print("|---|---|---|---|---|---|")
    for name in ("off", "on"):
        rows = results[name]
        per_round = ", ".join(f"{r['img_per_s']:,.1f}" for r in rows)
        print(f"| {name} | {per_round} | "
              f"{statistics.mean(r['img_per_s'] for r in rows):,.1f} | "
              f"{statistics.mean(r['p50_ms'] for r in rows):.1f} | {statistics.mean(r['p99_ms'] for r in rows):.1f} | "
              f"{sum(len(r['errors']) for r in rows)} |")
    print(f"\ncrops written to the queue: {written} of about {requests_on} answers sent to 'on' (the difference: "
          f"dropped when the bounded queue was full, counted in taxonet_review_dropped)")
    print(f"throughput with queueing / without = {ratio:.3f} (target ≥ 0.95)")


if __name__ == "__main__":
    main()
