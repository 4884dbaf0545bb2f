"""``taxonet demo``: the whole chain on the embedded default, with progress all along.

synthetic insect photos (folder tree) → ``prepare`` → Ray Train (2 local CPU workers) → ``evaluate`` (Table-4 report,
confusion matrices, unseen-species table) → Ray Serve on 127.0.0.1 → classify a few images over HTTP → print answers.
Local storage by default; ``--s3`` runs the same against an S3 server (moto's, on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="run the whole chain locally: data → train → evaluate → serve → classify")
    demo.add_argument("--out", default="taxonet-demo", help="working directory (default: ./taxonet-demo)")
    demo.add_argument("--per-species", type=int, default=100, help="synthetic images per species (default: 100)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo config's)")
    demo.add_argument("--image-size", type=int, default=48, help="image side in pixels (default: 48)")
    demo.add_argument("--port", type=int, default=8000, help="HTTP port of the demo server (default: 8000)")
    demo.add_argument("--s3", action="store_true", help="keep dataset and runs on a local S3 server (moto)")
    demo.add_argument("--serve", dest="wait", action="store_true", default=None,
                      help="keep serving after the demo until Ctrl-C (default when run in a terminal)")
    demo.add_argument("--no-serve", dest="wait", action="store_false", help="stop right after the demo")
    demo.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a demo config value (repeatable)")
    demo.set_defaults(handler=_demo)


class _Steps:
    def __init__(self, total: int) -> None:
        self.total, self.number, self.started = total, 0, time.monotonic()

    def __call__(self, text: str) -> None:
        self.number += 1
        elapsed = time.monotonic() - self.started
        print(f"\n[{self.number}/{self.total}] {text}  (+{elapsed:.0f} s)", flush=True)


def _start_s3() -> tuple[Any, str]:
    """moto's S3 server in this process on 127.0.0.1; exports the AWS variables before Ray starts."""
    from moto.server import ThreadedMotoServer

    from taxonet import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"})
    storage.s3_client().create_bucket(Bucket="taxonet-demo")
    return server, "s3://taxonet-demo"


def _pick_images(folder: Path, per_order: int = 1) -> list[Path]:
    picks: list[Path] = []
    for order in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(order.rglob("*.jpg"))
        picks.extend(files[-per_order:])
    return picks


def _post(url: str, path: Path) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url, data=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _describe(answer: dict[str, Any]) -> str:
    image = answer["predictions"][0]  # the response of POST /v1/classify: {"model": ..., "predictions": [...]}
    ranks = image.get("ranks", {})
    chain = " > ".join(f"{r['label']}{'' if r.get('reliable') else '?'}" for r in ranks.values())
    lowest = image.get("lowest_reliable_rank")
    trusted = f"{lowest}: {image.get('lowest_reliable_label')}" if lowest else "unsure at every rank"
    return f"{chain}   → trusted down to {trusted}"


def _demo(args: argparse.Namespace) -> int:
    from taxonet import raycluster
    from taxonet.config import load_config
    from taxonet.data.prepare import PrepareOptions, prepare_dataset
    from taxonet.data.synthetic import SyntheticInsects, unseen_species, write_image_folder
    from taxonet.taxonomy import Taxonomy

    step = _Steps(7)
    out = Path(args.out).resolve()
    wait = sys.stdin.isatty() if args.wait is None else args.wait
    taxonomy = Taxonomy.demo()
    print(f"taxonet demo: {taxonomy.describe()} (the demo tree of Bjerge et al. 2023); working in {out}")

    step("Rendering synthetic insect photos into a folder tree ORDER/FAMILY/SPECIES/*.jpg")
    shutil.rmtree(out / "images", ignore_errors=True)
    shutil.rmtree(out / "images-unseen", ignore_errors=True)
    generator = SyntheticInsects(taxonomy, image_size=args.image_size, seed=0)
    write_image_folder(out / "images", generator.samples(args.per_species))
    unseen = unseen_species(taxonomy, per_family=1, seed=0)
    write_image_folder(out / "images-unseen", generator.samples(max(10, args.per_species // 4), chains=unseen,
                                                                 start_index=50_000))
    print(f"  {args.per_species} images x {taxonomy.num_classes(taxonomy.depth - 1)} species, and {len(unseen)} species "
          f"never seen in training: {', '.join(c[-1] for c in unseen)}")

    server = None
    base = str(out)
    if args.s3:
        server, base = _start_s3()
        print(f"  storage: {base} on the local S3 server {os.environ['AWS_ENDPOINT_URL_S3']}")
    dataset, unseen_dataset, runs = f"{base}/dataset", f"{base}/unseen", f"{base}/runs"
    try:
        step(f"Preparing Parquet shards: taxonet prepare {out / 'images'} {dataset}")
        options = PrepareOptions(overwrite=True, max_side=args.image_size * 2)
        known = prepare_dataset(str(out / "images"), dataset, taxonomy=taxonomy, options=options)
        print(known.format_summary())
        extended = Taxonomy.from_rows([*taxonomy.rows(), *unseen], taxonomy.ranks)
        prepare_dataset(str(out / "images-unseen"), unseen_dataset, taxonomy=extended, options=options)

        step("Training with Ray Train on 2 local CPU workers (taxonet train --config demo)")
        overrides = {"data.dataset": dataset, "train.storage": runs, "data.input_size": args.image_size}
        if args.epochs:
            overrides["optim.epochs"] = args.epochs
        config = load_config("demo", overrides).with_overrides(args.sets)
        raycluster.init(num_cpus=2)  # worker output (per-epoch progress) is forwarded here
        from taxonet.train.driver import run_training

        result = run_training(config)
        print(f"  best checkpoint: {result.best_checkpoint}")

        step("Evaluating on the held-out test split and the unseen species (taxonet evaluate)")
        from taxonet.evaluate.render import write_report
        from taxonet.evaluate.run import run_evaluation

        report = run_evaluation(result.best_checkpoint, dataset, split="test", unseen_uri=unseen_dataset)
        paths = write_report(report, out / "report")
        report_path = paths.get("report", out / "report")
        print(Path(report_path).read_text(encoding="utf-8") if Path(report_path).is_file() else "")

        step(f"Serving the checkpoint with Ray Serve on http://127.0.0.1:{args.port}")
        from ray import serve

        from taxonet.serve.app import app_builder

        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(app_builder({"checkpoint": result.best_checkpoint, "device": "cpu",
                               "ingress": {"num_cpus": 0.25}, "classifier": {"num_cpus": 0.5}}),
                  name="taxonet", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}/v1/classify"

        step(f"Classifying a few images over HTTP: POST {url}")
        for path in _pick_images(out / "images") + _pick_images(out / "images-unseen"):
            truth = " > ".join(path.relative_to(path.parents[3]).parts[:3])
            print(f"  {truth}\n    answer: {_describe(_post(url, path))}")

        step("Done")
        print(f"  report:      {report_path}  (confusion matrices and curves beside it)")
        print(f"  checkpoint:  {result.best_checkpoint}")
        print(f"  try it:      curl -s -H 'Content-Type: image/jpeg' --data-binary @{_pick_images(out / 'images')[0]}"
              f" {url}")
        if wait:
            print(f"  serving at http://127.0.0.1:{args.port} (OpenAPI at /docs) — press Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        else:
            print("  server stopped (run `taxonet serve --checkpoint ...` to serve again)")
    finally:
        try:
            import ray

            if ray.is_initialized():
                from ray import serve

                serve.shutdown()
                ray.shutdown()
        finally:
            if server is not None:
                server.stop()
    return 0
