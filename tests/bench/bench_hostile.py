"""Hostile load on `taxonet serve`: memory, latency and status codes under the largest requests the limits allow.

Starts ``taxonet serve`` (the real CLI, an embedded Ray, one ingress and one classifier replica) on a tiny checkpoint
with the Serve application's default limits, and drives it for ``--seconds`` from ``--clients`` threads, each
cycling through a hostile mix:

    png16      one 16-bit grayscale PNG just under max_image_pixels (kilobytes on the wire, 40 MP decoded)
    jpeg       one 8-bit RGB JPEG just under max_image_pixels
    maxfiles   a multipart request with max_files of those 16-bit PNGs
    slow       a 16-bit PNG whose body trickles in over --trickle-seconds (a slow client holding a connection)
    budget     a multipart request with as many of those PNGs as max_request_pixels allows (when it is a setting)

Clients honour ``Retry-After`` on a 503 (they wait and retry while the run lasts, as a polite client does), so a
503 the server meant as backpressure is counted apart from a final answer. Peak RSS comes from the kernel's
high-water mark (VmHWM in /proc) of every ingress and classifier replica process the run saw; the ingress's is
compared with the worst case the settings allow (``worst_case_bytes``). A watchdog stops the run (and says so) if a replica passes
``--rss-limit-mb``, so a server without a memory bound cannot take the machine with it.

Prints Markdown tables for docs/benchmarks.md. ``--smoke`` runs a scaled-down mix (1 MP images, 4 clients, a few
seconds) to check the script still works (tests/serve/test_bench_hostile_smoke.py).

Usage:  .venv/bin/python tests/bench/bench_hostile.py [--seconds 60 --clients 32] [--smoke]
"""

from __future__ import annotations

import argparse
import http.client
import io
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from taxonet.serve.config import ServeArgs  # noqa: E402  (after the path set-up: runs from a checkout)
from tests.checkpoint_support import tiny_checkpoint  # noqa: E402
from tests.net_support import free_port, marked_processes  # noqa: E402

MIB = 1024 * 1024
MARK_ENV = "TAXONET_BENCH_MARK"
#: tries of one request answered 503 + Retry-After (a polite client waits and retries while the run lasts)
RETRIES = 30


# ---------------------------------------------------------------------------------------------------- requests
def png16(side: int) -> bytes:
    """A 16-bit grayscale PNG, side × side: a smooth gradient, so it is small on the wire and huge decoded."""
    ramp = np.linspace(0, 65535, side, dtype=np.float64)
    pixels = (np.add.outer(ramp, ramp) / 2).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def jpeg_rgb(side: int) -> bytes:
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    plane = np.add.outer(ramp, ramp) / 2
    pixels = np.stack([plane, plane[::-1], plane.T], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def multipart(files: list[bytes], content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f{i}.png\"\r\n"
             f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Kind:
    name: str
    body: bytes
    content_type: str
    trickle_s: float = 0.0  # > 0: the body is sent in small pieces over this many seconds


@dataclass
class Outcome:
    kind: str
    status: int | str  # the final HTTP status, or the exception's name
    seconds: float
    backpressure: int  # 503s with Retry-After answered before the final status


def send(port: int, kind: Kind, timeout: float = 300.0) -> tuple[int | str, float | None]:
    """One request on a fresh connection; returns (status or error name, Retry-After seconds of a 503)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.putrequest("POST", "/v1/classify")
        connection.putheader("Content-Type", kind.content_type)
        connection.putheader("Content-Length", str(len(kind.body)))
        connection.endheaders()
        if kind.trickle_s > 0:
            pieces = 20
            size = math.ceil(len(kind.body) / pieces)
            for start in range(0, len(kind.body), size):
                connection.send(kind.body[start:start + size])
                time.sleep(kind.trickle_s / pieces)
        else:
            connection.send(kind.body)
        response = connection.getresponse()
        response.read()
        retry = response.getheader("Retry-After")
        return response.status, (float(retry) if retry and response.status == 503 else None)
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, None
    finally:
        connection.close()


def client(port: int, kinds: list[Kind], offset: int, stop: threading.Event, outcomes: list[Outcome]) -> None:
    index = offset
    while not stop.is_set():
        kind = kinds[index % len(kinds)]
        index += 1
        start, backpressure = time.perf_counter(), 0
        while True:
            status, retry_after = send(port, kind)
            if retry_after is None or backpressure >= RETRIES or stop.is_set():
                break
            backpressure += 1
            time.sleep(max(retry_after, 0.1))
        if retry_after is not None:  # backpressure to the last try: the server was busy, it did not fail
            status = "503, run over" if stop.is_set() else f"503, gave up after {RETRIES} tries"
        outcomes.append(Outcome(kind.name, status, time.perf_counter() - start, backpressure))


# ---------------------------------------------------------------------------------------------------- processes
def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB; (0, 0) once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


@dataclass
class Watch:
    """Peak memory of every ingress/classifier replica process seen; trips when one passes ``limit_kib``."""

    mark: str
    limit_kib: int
    peak_kib: dict[str, dict[int, int]] = field(default_factory=lambda: {"ingress": {}, "classifier": {}})
    tripped: str | None = None

    def replicas(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {"ingress": [], "classifier": []}
        for pid, line in marked_processes(MARK_ENV, self.mark).items():
            if "TaxonetIngress" in line:
                found["ingress"].append(pid)
            elif "TaxonetClassifier" in line:
                found["classifier"].append(pid)
        return found

    def sample(self) -> None:
        for role, pids in self.replicas().items():
            for pid in pids:
                rss, hwm = memory_kib(pid)
                peaks = self.peak_kib[role]
                peaks[pid] = max(peaks.get(pid, 0), rss, hwm)
                if rss > self.limit_kib and self.tripped is None:
                    self.tripped = f"{role} replica {pid} reached {rss / 1024:.0f} MB (limit {self.limit_kib // 1024})"

    def run(self, stop: threading.Event, interval: float = 0.25) -> None:
        while not stop.is_set():
            self.sample()
            if self.tripped:
                stop.set()
            time.sleep(interval)


# ---------------------------------------------------------------------------------------------------- bound
def worst_case_bytes(args: ServeArgs) -> tuple[int | None, str]:
    """The ingress replica's worst case beyond its idle size, from the settings, and how it was worked out.

    With a decode budget (``decode_pixel_budget``, ``max_concurrent_requests``: docs/api.md gives the formula) the
    bound is the bodies the replica may hold at once plus the pixels it may decode at once; without one there is
    no bound: every admitted request decodes all its images at once.
    """
    settings = args.model_dump()
    if "decode_pixel_budget" in settings and "max_concurrent_requests" in settings:
        bodies = settings["max_concurrent_requests"] * settings["max_request_bytes"]
        decode = 10 * settings["decode_pixel_budget"]  # docs/api.md: about 10 bytes per pixel being decoded
        return bodies + decode, (f"max_concurrent_requests × max_request_bytes + 10 B × decode_pixel_budget = "
                                 f"{settings['max_concurrent_requests']} × {settings['max_request_bytes'] // MIB} MiB"
                                 f" + 10 B × {settings['decode_pixel_budget']:,}")
    ongoing = args.ingress.max_ongoing_requests
    return None, (f"no bound: up to {ongoing} requests × {settings['max_files']} files × "
                  f"{settings['max_image_pixels']:,} px decoded at once (no decode budget in ServeArgs)")


# ---------------------------------------------------------------------------------------------------- run
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def start_server(checkpoint: Path, port: int, mark: str, num_cpus: int) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", MARK_ENV: mark,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    env.pop("TAXONET_API_TOKEN", None)
    command = [sys.executable, "-m", "taxonet.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
               "--num-cpus", str(num_cpus), "--device", "cpu", "--max-replicas", "1", "--ingress-cpus", "0.5",
               "--classifier-cpus", "0.5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 600
    while not any("Ctrl-C to stop" in line for line in output):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("taxonet serve did not start:\n" + "".join(output[-40:]))
        time.sleep(0.5)
    return process, output


def stop_server(process: subprocess.Popen[str], mark: str) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
    for pid in marked_processes(MARK_ENV, mark):  # the command ends its Ray itself; this only guards a broken run
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the load (default: 60)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    parser.add_argument("--trickle-seconds", type=float, default=10.0, help="how long a slow client takes to send")
    parser.add_argument("--rss-limit-mb", type=int, default=6144,
                        help="stop the run when a replica's RSS passes this (protects the machine; default: 6144)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray (default: 2)")
    parser.add_argument("--smoke", action="store_true", help="1 MP images, 4 clients, 6 s: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.clients, args.trickle_seconds = 6.0, 4, 1.0

    settings = ServeArgs(model="unused")  # the defaults `taxonet serve` runs with
    side = 1000 if args.smoke else math.isqrt(settings.max_image_pixels)
    files = 4 if args.smoke else settings.max_files
    print(f"# building the hostile mix: {side}×{side} px ({side * side:,} px), {files} files per multipart", flush=True)
    big16, big_jpeg = png16(side), jpeg_rgb(side)
    body, content_type = multipart([big16] * files, "image/png")
    kinds = [Kind("png16", big16, "image/png"), Kind("jpeg", big_jpeg, "image/jpeg"),
             Kind("maxfiles", body, content_type), Kind("slow", big16, "image/png", args.trickle_seconds)]
    request_pixels = settings.model_dump().get("max_request_pixels")
    if request_pixels:  # as many of the largest images as one request's pixel budget allows
        budget_body, budget_type = multipart([big16] * max(1, min(files, request_pixels // (side * side))), "image/png")
        kinds.append(Kind("budget", budget_body, budget_type))

    mark = uuid.uuid4().hex
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "ckpt", version="hostile")
        process, output = start_server(checkpoint, port, mark, args.num_cpus)
        watch = Watch(mark, args.rss_limit_mb * 1024)
        outcomes: list[Outcome] = []
        try:
            small = Kind("warm-up", jpeg_rgb(64), "image/jpeg")
            assert send(port, small)[0] == 200, "".join(output[-40:])
            watch.sample()
            idle = {role: {pid: memory_kib(pid)[0] for pid in pids} for role, pids in watch.replicas().items()}
            stop = threading.Event()
            threads = [threading.Thread(target=client, args=(port, kinds, i, stop, outcomes), daemon=True)
                       for i in range(args.clients)]
            watcher = threading.Thread(target=watch.run, args=(stop,), daemon=True)
            started = time.perf_counter()
            watcher.start()
            for thread in threads:
                thread.start()
            stop.wait(args.seconds)
            stop.set()
            for thread in threads:
                thread.join(timeout=360)
            elapsed = time.perf_counter() - started
            watch.sample()
        finally:
            stop_server(process, mark)

    bound, formula = worst_case_bytes(settings)
    print(f"\n{platform.node()} · {os.cpu_count()} CPUs · {args.clients} clients · {elapsed:.0f} s"
          f"{' (smoke)' if args.smoke else ''}; images {side}×{side} px; settings: ServeArgs defaults")
    if watch.tripped:
        print(f"\n**STOPPED by the watchdog**: {watch.tripped}")
    print("\n| process | replicas seen | idle RSS MB | peak RSS MB | worst case MB (formula) |")
    print("|---|---|---|---|---|")
    for role in ("ingress", "classifier"):
        peaks = watch.peak_kib[role]
        idle_mb = max(idle.get(role, {}).values(), default=0) / 1024
        peak_mb = max(peaks.values(), default=0) / 1024
        limit = f"{idle_mb + bound / MIB:,.0f} (idle + {bound / MIB:,.0f})" if role == "ingress" and bound else "–"
        print(f"| {role} | {len(peaks)} | {idle_mb:,.0f} | {peak_mb:,.0f} | {limit} |")
    print(f"\nworst case of the ingress: {formula}")
    print("\n| kind | requests | final statuses | 503 + Retry-After (retried) | p50 s | p99 s |")
    print("|---|---|---|---|---|---|")
    for kind in [k.name for k in kinds] + ["all"]:
        rows = [o for o in outcomes if kind in ("all", o.kind)]
        statuses = Counter(str(o.status) for o in rows)
        shown = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
        seconds = [o.seconds for o in rows]
        print(f"| {kind} | {len(rows)} | {shown} | {sum(o.backpressure for o in rows)} | "
              f"{statistics.median(seconds) if seconds else float('nan'):.2f} | {percentile(seconds, 0.99):.2f} |")
    server_errors = sum(1 for o in outcomes if isinstance(o.status, int) and o.status >= 500)
    errors = sum(1 for o in outcomes if isinstance(o.status, str) and not o.status.startswith("503"))
    print(f"\nfinal 5xx answers (faults: any 5xx but a 503 with Retry-After): {server_errors}; "
          f"connection errors: {errors}; requests: {len(outcomes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
