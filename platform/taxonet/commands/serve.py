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
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve (until Ctrl-C)",
                                  description="Serve a checkpoint: POST /v1/classify, GET /v1/taxonomy, /v1/model, "
                                              "/healthz, OpenAPI at /docs (docs/api.md).")
    serve.add_argument("--model", "--checkpoint", dest="model", required=True,
                       help="what to serve, followed while serving: a checkpoint directory (local path, file:// or "
                            "s3://) or a registry reference MODELS/NAME@ALIAS (docs/models.md); --checkpoint is "
                            "its older name")
    serve.add_argument("--model-poll", type=float, default=None,
                       help="seconds between polls of --model (default: ServeArgs.model_poll_s, 30)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--device", default="auto",
                       help="auto (a GPU for the model if this machine has one), cpu, cuda or cuda:N; on a cluster "
                            "(--address) auto means CPU: pass cuda to give the model replicas a GPU each")
    serve.add_argument("--token", default=None,
                       help="require 'Authorization: Bearer TOKEN' on /v1/* (default: $TAXONET_API_TOKEN, else none)")
    serve.add_argument("--top-k", type=int, default=3, help="labels with probabilities per rank (default: 3)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="images per model batch (default: 32)")
    serve.add_argument("--batch-wait", type=float, default=0.01,
                       help="seconds a batch waits to fill (default: 0.01)")
    serve.add_argument("--max-replicas", type=int, default=2, help="autoscaling ceiling per deployment (default: 2)")
    serve.add_argument("--name", default="taxonet", help="Serve application name (default: taxonet)")
    serve.add_argument("--route-prefix", default="/", help="URL prefix of the API (default: /)")
    serve.add_argument("--address", default=None,
                       help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray")
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

    from taxonet import raycluster
    from taxonet.serve.app import app_builder
    from taxonet.serve.config import TOKEN_ENV

    from taxonet import registry, storage

    reference = registry.parse_reference(args.model)  # a malformed reference or unknown scheme: one clear line
    if not reference.is_registry and storage.is_local(args.model):
        # a local checkpoint must exist now (a typo'd path would only make the server wait); a registry alias may
        # be promoted after the server starts
        from taxonet.checkpoint import materialize, read_manifest

        read_manifest(materialize(args.model))
    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    token = args.token or os.environ.get(TOKEN_ENV)
    if token:  # the ingress reads it from its environment (never from Serve args); embedded Ray's workers inherit it
        os.environ[TOKEN_ENV] = token
    raycluster.init(args.address, num_cpus=args.num_cpus)
    app_args: dict[str, Any] = {
        "model": args.model, "device": args.device, "top_k": args.top_k,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait,
        "ingress": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": args.max_replicas,
                                                     "target_ongoing_requests": 16}},
        "classifier": {"num_cpus": 1, "num_gpus": _gpus_for(args.device, embedded),
                       "max_ongoing_requests": max(64, args.max_batch_size),
                       "autoscaling": {"min_replicas": 1, "max_replicas": args.max_replicas,
                                       "target_ongoing_requests": max(1, args.max_batch_size)}},
    }
    if args.model_poll is not None:
        app_args["model_poll_s"] = args.model_poll
    stop = _stop_on_signals()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        host, port = _http_address(args.host, args.port)
        serve.run(app_builder(app_args), name=args.name, route_prefix=args.route_prefix)
        base = f"http://{host}:{port}{args.route_prefix.rstrip('/')}"
        print(f"taxonet: serving {args.model} at {base}/v1/classify (OpenAPI: {base}/docs); "
              f"Ctrl-C to stop", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("taxonet: stopping", flush=True)
        try:
            if embedded:
                serve.shutdown()
            else:
                serve.delete(args.name)  # leave the shared cluster's other applications alone
        finally:
            if embedded:
                ray.shutdown()
    return 0


def _gpus_for(device: str, embedded: bool) -> float:
    """One GPU for the classifier when the device asks for CUDA, or is "auto" on a machine that has one."""
    if device.startswith("cuda"):
        return 1.0
    if device == "auto" and embedded:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 0.0


def _stop_on_signals() -> dict[str, bool]:
    """SIGTERM (docker stop, kill) ends the server like Ctrl-C does."""
    state = {"now": False}

    def handler(signum: int, _frame: Any) -> None:
        state["now"] = True

    signal.signal(signal.SIGTERM, handler)
    return state


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
