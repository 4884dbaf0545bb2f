"""CLI verbs for serving: ``serve`` (the HTTP API on Ray Serve, until Ctrl-C) and ``classify`` (images → answers).

``taxonet serve --model REF`` (a checkpoint URI or ``MODELS/NAME@ALIAS``, followed while serving) starts an embedded
local Ray (or joins ``--address`` / $RAY_ADDRESS), deploys
``taxonet.serve.app:app_builder`` and blocks; Ctrl-C or SIGTERM removes the application (and stops the embedded Ray).
``taxonet classify TARGET IMAGES...`` answers with the in-process predictor when TARGET is a checkpoint, or POSTs the
images to a running server when TARGET is an http(s) URL; it prints one JSON object per image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: the verb handlers import these when they run
    from taxonet.raycluster import EmbeddedRay
    from taxonet.serve.config import ServeArgs

#: seconds Ctrl-C/SIGTERM waits for a graceful stop before it ends the embedded Ray's processes
SHUTDOWN_TIMEOUT_S = 20.0


def register(subparsers: argparse._SubParsersAction) -> None:
    # Defaults of the Serve application are stated once, in taxonet.serve.config.ServeArgs: a flag left out is not
    # passed on (importing ServeArgs here would slow down `taxonet --help`).
    serve = subparsers.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve (until Ctrl-C)",
                                  description="Serve a checkpoint: POST /v1/classify, GET /v1/taxonomy, /v1/model, "
                                              "/healthz, OpenAPI at /docs (docs/api.md). Options left out take the "
                                              "Serve application's defaults (ServeArgs, docs/api.md).")
    serve.add_argument("--model", "--checkpoint", dest="model", required=True,
                       help="what to serve, followed while serving: a checkpoint directory (local path, file:// or "
                            "s3://) or a registry reference MODELS/NAME@ALIAS (docs/models.md); --checkpoint is "
                            "its older name")
    serve.add_argument("--model-poll", type=float, default=None,
                       help="seconds between polls of --model")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--device", default=None,
                       help="auto (a GPU for the model if this machine has one), cpu, cuda or cuda:N; on a cluster "
                            "(--address) auto means CPU: pass cuda to give the model replicas a GPU each")
    serve.add_argument("--token", default=None,
                       help="require 'Authorization: Bearer TOKEN' on /v1/* (default: $TAXONET_API_TOKEN, else none)")
    serve.add_argument("--top-k", type=int, default=None, help="labels with probabilities per rank")
    serve.add_argument("--max-batch-size", type=int, default=None, help="images per model batch")
    serve.add_argument("--batch-wait", type=float, default=None, help="seconds a batch waits to fill")
    serve.add_argument("--max-replicas", type=int, default=None, help="autoscaling ceiling of each deployment")
    serve.add_argument("--ingress-cpus", type=float, default=None, help="CPUs reserved per ingress replica")
    serve.add_argument("--classifier-cpus", type=float, default=None, help="CPUs reserved per model replica")
    serve.add_argument("--name", default="taxonet", help="Serve application name (default: taxonet)")
    serve.add_argument("--route-prefix", default="/", help="URL prefix of the API (default: /)")
    serve.add_argument("--address", default=None,
                       help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray")
    serve.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S,
                       help="seconds the shutdown waits for Serve to drain before it ends an embedded Ray's "
                            f"processes, or for --address, for its app to be deleted (default: {SHUTDOWN_TIMEOUT_S})")
    serve.set_defaults(handler=_serve)

    classify = subparsers.add_parser("classify", help="classify image files with a checkpoint or a running server",
                                     description="Print one JSON answer per image (format: docs/api.md).")
    classify.add_argument("target", help="checkpoint (local path, file:// or s3://) or server URL (http://...)")
    classify.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP)")
    classify.add_argument("--device", default="auto", help="for a checkpoint: auto, cpu, cuda or cuda:N")
    classify.add_argument("--top-k", type=int, default=3, help="for a checkpoint: labels per rank (default: 3)")
    classify.add_argument("--batch-size", type=int, default=32, help="for a checkpoint: images per batch")
    classify.add_argument("--token", default=None, help="for a server: bearer token (default: $TAXONET_API_TOKEN)")
    classify.set_defaults(handler=_classify)


# ---------------------------------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from taxonet import raycluster, registry, storage
    from taxonet.serve.app import app_builder
    from taxonet.serve.config import TOKEN_ENV

    reference = registry.parse_reference(args.model)  # a malformed reference or unknown scheme: one clear line
    if not reference.is_registry and storage.is_local(args.model):
        # a local checkpoint must exist now (a typo'd path would only make the server wait); a registry alias may
        # be promoted after the server starts
        from taxonet.checkpoint import materialize, read_manifest

        read_manifest(materialize(args.model))
    embedded_wanted = not (args.address or os.environ.get("RAY_ADDRESS"))
    config = _serve_args(args, embedded_wanted)
    token = (args.token or os.environ.get(TOKEN_ENV) or "").strip()
    # The token reaches the replicas as an environment variable of this job (Serve deployments inherit the driver's
    # runtime_env, on an embedded Ray as on a remote cluster), never as a Serve argument.
    init_options: dict[str, Any] = {"runtime_env": {"env_vars": {TOKEN_ENV: token}}} if token else {}
    signals = _Signals()
    embedded: EmbeddedRay | None = None
    clean = False
    try:
        embedded = raycluster.init(args.address, num_cpus=args.num_cpus, **init_options)
        signals.install()  # after ray.init, which sets its own SIGTERM handler
        if embedded is not None:
            print(f"taxonet: embedded Ray session {embedded.session_dir}", flush=True)
        serve.start(http_options={"host": args.host, "port": args.port})
        host, port = _http_address(args.host, args.port)
        serve.run(app_builder(config), name=args.name, route_prefix=args.route_prefix)
        base = f"http://{host}:{port}{args.route_prefix.rstrip('/')}"
        print(f"taxonet: serving {args.model} at {base}/v1/classify (OpenAPI: {base}/docs); "
              f"Ctrl-C to stop", flush=True)
        signals.serving = True
        while not signals.stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        print("taxonet: stopping", flush=True)
        signals.stopping(lambda: raycluster.kill_session(embedded.mark) if embedded is not None else None)
        if embedded is not None:
            # drain Serve for at most half the budget, then end Ray and whatever of its session is left
            if _bounded(serve.shutdown, args.shutdown_timeout / 2):
                clean = not raycluster.shutdown(embedded, timeout_s=args.shutdown_timeout / 2)
            else:
                # serve.shutdown still runs in its thread: ray.shutdown beside it would end this process with an
                # error (Ray's core worker exits when it is used after shutdown). End the session's processes instead.
                raycluster.kill_session(embedded.mark)
        elif not ray.is_initialized():
            clean = True  # never connected: nothing to undo
        else:
            if _bounded(lambda: _delete_app(serve, args.name, args.shutdown_timeout), args.shutdown_timeout):
                clean = _bounded(ray.shutdown, args.shutdown_timeout / 2)
            else:  # leave without ray.shutdown while the deletion's thread still uses Ray (see above)
                print(f"taxonet: the cluster had not finished deleting application {args.name!r} after "
                      f"{args.shutdown_timeout:g} s; its controller goes on with it", file=sys.stderr, flush=True)
        print("taxonet: stopped", flush=True)
    if not clean:
        # a Ray call may still hang in a helper thread, and Ray's atexit hook would wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _serve_args(args: argparse.Namespace, embedded: bool) -> ServeArgs:
    """The Serve application's arguments: ServeArgs' defaults, overridden only by the flags given."""
    from taxonet.serve.config import ServeArgs

    defaults = ServeArgs(model=args.model)
    fields: dict[str, Any] = {"model": args.model}
    for flag, field in (("device", "device"), ("top_k", "top_k"), ("max_batch_size", "max_batch_size"),
                        ("batch_wait", "batch_wait_timeout_s"), ("model_poll", "model_poll_s")):
        if getattr(args, flag) is not None:
            fields[field] = getattr(args, flag)
    for name, cpus in (("ingress", args.ingress_cpus), ("classifier", args.classifier_cpus)):
        deployment = getattr(defaults, name).model_dump()
        if cpus is not None:
            deployment["num_cpus"] = cpus
        if args.max_replicas is not None and deployment["autoscaling"] is not None:
            deployment["autoscaling"] = {**deployment["autoscaling"], "max_replicas": args.max_replicas}
        fields[name] = deployment
    classifier = fields["classifier"]
    # a batch can only fill when the replica takes that many calls at once
    classifier["max_ongoing_requests"] = max(classifier["max_ongoing_requests"],
                                             fields.get("max_batch_size", defaults.max_batch_size))
    if _gpus_for(fields.get("device", defaults.device), embedded):
        classifier["num_gpus"] = 1.0
    return ServeArgs.model_validate(fields)


def _gpus_for(device: str, embedded: bool) -> float:
    """One GPU for the classifier when the device asks for CUDA, or is "auto" on a machine that has one."""
    if device.startswith("cuda"):
        return 1.0
    if device == "auto" and embedded:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 0.0


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM (docker stop, kill, Kubernetes) end the server the same way.

    While starting, the first signal interrupts the start (KeyboardInterrupt); while serving, it lets the main loop
    leave; during the shutdown a second one ends the process at once, after killing an embedded Ray's processes.
    """

    def __init__(self) -> None:
        self.stop = False
        self.serving = False
        self._force: Callable[[], object] | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def stopping(self, force: Callable[[], object]) -> None:
        self.stop = True
        self._force = force

    def _handle(self, signum: int, _frame: object) -> None:
        if self._force is not None:
            print(f"taxonet: {signal.Signals(signum).name} during shutdown: exiting now", file=sys.stderr, flush=True)
            self._force()
            os._exit(1)
        self.stop = True
        if not self.serving:
            raise KeyboardInterrupt


def _bounded(call: Callable[[], object], timeout_s: float) -> bool:
    """Run ``call`` in a daemon thread; True when it returned without error within ``timeout_s``."""
    outcome: list[bool] = []

    def run() -> None:
        try:
            call()
            outcome.append(True)
        except Exception as exc:  # a cluster in a bad state: reported, and the shutdown goes on
            print(f"taxonet: {getattr(call, '__name__', 'shutdown step')} failed: {exc!r}", file=sys.stderr,
                  flush=True)
            outcome.append(False)

    thread = threading.Thread(target=run, name="taxonet-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(outcome and outcome[0])


def _delete_app(serve: ModuleType, name: str, timeout_s: float) -> None:
    """Delete this command's application only (the cluster's other applications and Serve itself stay)."""
    serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while name in serve.status().applications:
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {name!r} still present after {timeout_s:g} s")
        time.sleep(0.5)


def _http_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxy really listens: a Serve already running on the cluster keeps its own HTTP options."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        if (config.host, config.port) != (host, port):
            print(f"taxonet: Serve was already running with HTTP on {config.host}:{config.port}; "
                  f"--host/--port do not apply", file=sys.stderr)
        return ("127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host), int(config.port)
    except Exception:  # only used for the message: any failure falls back to what was asked for
        return host, port


# ---------------------------------------------------------------------------------------------------- classify
def _classify(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    if args.target.startswith(("http://", "https://")):
        results = _classify_remote(args.target, paths, args.token or os.environ.get("TAXONET_API_TOKEN"))
    else:
        results = _classify_local(args, paths)
    failed = 0
    for path, result in zip(paths, results):
        failed += "error" in result
        print(json.dumps({"image": str(path), **result}, ensure_ascii=False))
    return 1 if failed else 0


def _classify_local(args: argparse.Namespace, paths: list[Path]) -> list[dict[str, Any]]:
    from taxonet.data.transforms import ImageDecodeError
    from taxonet.serve.predictor import Predictor

    predictor = Predictor.from_checkpoint(args.target, device=args.device, top_k=args.top_k)
    results: list[dict[str, Any]] = [{} for _ in paths]
    decoded: list[tuple[int, Any]] = []
    for index, path in enumerate(paths):
        try:
            decoded.append((index, predictor.preprocess(path.read_bytes())))
        except ImageDecodeError as exc:  # one bad file is reported, the others are still answered
            results[index] = {"error": {"code": exc.code, "message": exc.message}}
    import torch

    model = {"name": predictor.name, "version": predictor.version}
    for start in range(0, len(decoded), max(1, args.batch_size)):
        chunk = decoded[start:start + args.batch_size]
        answers = predictor.predict_tensors(torch.stack([tensor for _, tensor in chunk]))
        for (index, _), answer in zip(chunk, answers):
            results[index] = {"model": model, **answer.to_dict()}
    return results


def _classify_remote(url: str, paths: list[Path], token: str | None) -> list[dict[str, Any]]:
    import httpx

    from taxonet.serve.predictor import sniff_format

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one JSON line per image on stdout, no request log
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    types = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
             "TIFF": "image/tiff"}
    results = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=60) as client:
        for path in paths:
            data = path.read_bytes()
            # unknown bytes go out as JPEG so the server says what is wrong with them (corrupt), not with the header
            content_type = types.get(sniff_format(data) or "", "image/jpeg")
            response = client.post("/v1/classify", content=data, headers={**headers, "content-type": content_type})
            try:
                body = response.json()
            except ValueError:
                body = {}
            if response.status_code == 200:
                answer = dict(body["predictions"][0])
                answer.pop("filename", None)
                results.append({"model": body["model"], **answer})
            else:
                results.append({"error": body.get("error") or {"code": f"http_{response.status_code}",
                                                               "message": response.text[:500]}})
    return results
