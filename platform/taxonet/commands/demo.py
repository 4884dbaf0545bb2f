"""``taxonet demo``: what the method is for, end to end, in a few minutes on a laptop's CPU.

synthetic insect photos (folder tree, with family-level "bycatch") → ``prepare`` → Ray Train (2 local CPU workers,
the per-rank cross-entropies, the soft dependency term and outlier exposure) → ``evaluate`` (known species, and
species never seen in training) → Ray Serve on 127.0.0.1 → classify a few images over HTTP → a final table per
unseen species: how often the answer is "unsure at species, reliable at a correct family or order". Local storage by default; ``--s3`` runs the same against
an S3 server (moto's, on 127.0.0.1). ``--paper-loss`` trains with the paper's loss alone, for comparison.

The recipe (tree, image counts, config ``demo``) is measured over seeds by ``tests/bench/demo_recipe.py``; its
figures are in docs/evaluation.md. The helpers below are shared with that script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: what --paper-loss should show (tests/bench/demo_recipe.py --paper-loss, docs/evaluation.md "The demo")
PAPER_LOSS_EXPECTATION = ("with the paper's loss alone the known species are learnt, but most images of unseen "
                          "species are answered at species, with a wrong species (over 3 seeds on 2 CPU cores: "
                          "species F1 0.928 ± 0.017, unseen unsure at species 0.397 ± 0.059, at a correct higher "
                          "rank 0.328 ± 0.039; with outlier exposure 0.919 ± 0.013 and 0.814 ± 0.047; "
                          "docs/evaluation.md)")


@dataclass(frozen=True)
class DemoData:
    """The demo's images: a grid-shaped tree, known species, family-level bycatch and unseen species."""

    #: the tree: orders x families per order x species per family (names "Ordo A" > "Familia A1" > "Species A1a")
    orders: int = 2
    families_per_order: int = 2
    species_per_family: int = 3
    per_species: int = 120
    image_size: int = 40
    #: bycatch: insects of a known family that are none of its species, labelled down to the family only. Many
    #: kinds of them (every mark pattern the family's own species lack, then the same in other mark colours) is what
    #: teaches the family head to read the family's shape rather than the marks (docs/evaluation.md: with 4 kinds
    #: × 30 images a third of an unseen species could be answered at a wrong family; 8 kinds × 30 met issue 15's
    #: targets over 3 seeds)
    bycatch_species_per_family: int = 8
    #: images per family over all its bycatch kinds; None = 2 × per_species (240 at the default)
    bycatch_images: int | None = None
    #: one unseen species per family, this many images each (never in training; a second dataset)
    unseen_images: int = 30
    seed: int = 0

    @property
    def bycatch_images_per_family(self) -> int:
        return self.bycatch_images if self.bycatch_images is not None else 2 * self.per_species


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoData()
    demo = subparsers.add_parser("demo", help="run the whole chain locally: data → train → evaluate → serve → classify")
    demo.add_argument("--out", default="taxonet-demo", help="working directory (default: ./taxonet-demo)")
    demo.add_argument("--per-species", type=int, default=defaults.per_species,
                      help=f"synthetic images per known species (default: {defaults.per_species})")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo config's)")
    demo.add_argument("--image-size", type=int, default=defaults.image_size,
                      help=f"image side in pixels (default: {defaults.image_size})")
    demo.add_argument("--seed", type=int, default=0, help="train.seed (default: 0)")
    demo.add_argument("--paper-loss", action="store_true",
                      help="train with the paper's loss alone (no outlier exposure), for comparison")
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


# ---------------------------------------------------------------------------------------------------------- helpers
def render_demo_images(out: Path, data: DemoData) -> tuple[Any, list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Write ``out/images`` (known species, and bycatch under ORDER/FAMILY/) and ``out/images-unseen``.

    Returns the taxonomy, the bycatch chains and the unseen chains.
    """
    from taxonet.data.synthetic import SyntheticInsects, synthetic_taxonomy, unseen_species, write_image_folder

    taxonomy = synthetic_taxonomy(data.orders, data.families_per_order, data.species_per_family)
    shutil.rmtree(out / "images", ignore_errors=True)
    shutil.rmtree(out / "images-unseen", ignore_errors=True)
    generator = SyntheticInsects(taxonomy, image_size=data.image_size, seed=data.seed)
    write_image_folder(out / "images", generator.samples(data.per_species))
    bycatch = generator.outlier_species(data.bycatch_species_per_family)
    per_bycatch = max(1, data.bycatch_images_per_family // data.bycatch_species_per_family)
    for sample in generator.samples(per_bycatch, chains=bycatch, start_index=data.per_species):
        folder = out / "images" / Path(*sample.labels[:-1])  # labelled down to the family: ORDER/FAMILY/*.jpg
        folder.mkdir(parents=True, exist_ok=True)
        sample.image.save(folder / f"bycatch-{sample.labels[-1].rsplit(' ', 1)[-1]}-{sample.index}.jpg",
                          format="JPEG", quality=95)
    unseen = unseen_species(taxonomy, per_family=1, seed=data.seed)
    write_image_folder(out / "images-unseen", generator.samples(data.unseen_images, chains=unseen,
                                                                start_index=50_000))
    return taxonomy, bycatch, unseen


def prepare_demo(out: Path, base: str, taxonomy: Any, unseen: list[tuple[str, ...]],
                 image_size: int) -> tuple[str, str, Any]:
    """Parquet datasets of the known images (train/val/test) and of the unseen species; returns their URIs."""
    from taxonet.data.prepare import PrepareOptions, prepare_dataset
    from taxonet.taxonomy import Taxonomy

    dataset, unseen_dataset = f"{base}/dataset", f"{base}/unseen"
    options = PrepareOptions(overwrite=True, max_side=image_size * 2, progress=False)
    known = prepare_dataset(str(out / "images"), dataset, taxonomy=taxonomy, options=options)
    extended = Taxonomy.from_rows([*taxonomy.rows(), *unseen], taxonomy.ranks)
    prepare_dataset(str(out / "images-unseen"), unseen_dataset, taxonomy=extended, options=options)
    return dataset, unseen_dataset, known


def demo_config(dataset: str, runs: str, image_size: int, *, seed: int = 0, paper_loss: bool = False,
                epochs: int | None = None, sets: list[str] | None = None, run_name: str = "demo") -> Any:
    """The ``demo`` config pointed at the demo's data (``--paper-loss``: the paper's loss, dependency "paper" and
    loss.outlier_weight = 0)."""
    from taxonet.config import load_config

    overrides: dict[str, Any] = {"data.dataset": dataset, "train.storage": runs, "data.input_size": image_size,
                                 "train.seed": seed, "train.run_name": run_name}
    if paper_loss:  # the paper's loss: its argmax dependency term, no outlier exposure
        overrides["loss.outlier_weight"] = 0.0
        overrides["loss.dependency"] = "paper"
    if epochs:
        overrides["optim.epochs"] = epochs
    return load_config("demo", overrides).with_overrides(sets or [])


def unseen_table(report: Any) -> str:
    """Per unseen species: images, unsure at species, reported at a correct higher rank, wrongly reliable."""
    from taxonet.data.dataset import format_table

    unseen = report.unseen
    rows = []
    for result in [*unseen.classes, unseen.overall]:
        where = " > ".join(n for n in result.lineage if n) or "all unseen species"
        name = result.name if result.name != "all" else "all"
        rows.append([name, where, result.images, f"{result.unsure_at_leaf:.0%}", f"{result.correct_higher:.0%}",
                     f"{result.wrongly_reliable:.0%}"])
    return format_table(["unseen species", "true order > family", "images", "unsure at species",
                         "correct higher rank", "wrongly reliable"], rows)


def known_summary(report: Any) -> list[str]:
    """Two lines: macro F1 per rank on the known test split, and how the known species are answered."""
    f1 = ", ".join(f"{rank} {values['f1']:.3f}" for rank, values in report.rank_metrics.items())
    lines = [f"  known species, test split ({report.images} images): macro F1 {f1}"]
    if report.lowest_reliable is not None:
        shares = ", ".join(f"{rank} {share:.0%}" for rank, share in report.lowest_reliable.items())
        lines.append(f"  answered down to: {shares}")
    return lines


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
        files = sorted(f for f in order.rglob("*.jpg") if not f.name.startswith("bycatch"))
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
    trusted = f"{lowest} {image.get('lowest_reliable_label')}" if lowest else "unsure at every rank"
    return f"{chain}  → trusted down to {trusted}"


# ---------------------------------------------------------------------------------------------------------- the verb
def _demo(args: argparse.Namespace) -> int:
    from taxonet import raycluster

    if not args.verbose:  # the demo tells its own story: taxonet's INFO lines only with -v
        logging.getLogger("taxonet").setLevel(logging.WARNING)
    step = _Steps(6)
    out = Path(args.out).resolve()
    wait = sys.stdin.isatty() if args.wait is None else args.wait
    data = DemoData(per_species=args.per_species, image_size=args.image_size)
    print(f"taxonet demo: classify insects at order, family and species, and say down to which rank to trust the "
          f"answer (Bjerge et al. 2023). Working in {out}")

    step("Rendering synthetic insect photos: ORDER/FAMILY/SPECIES/*.jpg, bycatch in ORDER/FAMILY/*.jpg")
    taxonomy, bycatch, unseen = render_demo_images(out, data)
    print(f"  tree: {taxonomy.describe()}; {data.per_species} images per species")
    print(f"  bycatch: {data.bycatch_images_per_family} images per family of {len(bycatch) // len(unseen)} other "
          "insects, labelled to the family only (outlier exposure teaches the model to doubt its species)")
    print(f"  never seen in training: {', '.join(c[-1] for c in unseen)} ({data.unseen_images} images each)")

    server = None
    base = str(out)
    if args.s3:
        server, base = _start_s3()
        print(f"  storage: {base} on the local S3 server {os.environ['AWS_ENDPOINT_URL_S3']}")
    runs = f"{base}/runs"
    try:
        step("Preparing Parquet shards (taxonet prepare)")
        dataset, unseen_dataset, known = prepare_demo(out, base, taxonomy, unseen, data.image_size)
        splits = ", ".join(f"{split} {known.info.num_rows(split)}" for split in known.info.splits)
        print(f"  {dataset}: {splits} images; unseen species in {unseen_dataset}")

        config = demo_config(dataset, runs, data.image_size, seed=args.seed, paper_loss=args.paper_loss,
                             epochs=args.epochs, sets=args.sets)
        loss = ("the paper's loss alone (--paper-loss)" if config.loss.outlier_weight == 0 else
                f"cross-entropies + {config.loss.dependency} dependency term + outlier exposure (weight "
                f"{config.loss.outlier_weight:g})")
        step(f"Training with Ray Train on 2 local CPU workers: {config.optim.epochs} epochs, {loss}")
        if args.paper_loss:
            print(f"  what to expect (measured by tests/bench/demo_recipe.py --paper-loss): {PAPER_LOSS_EXPECTATION}")
        raycluster.init(num_cpus=2)
        from taxonet.train.driver import run_training

        result = run_training(config)
        print(f"  best checkpoint: {result.best_checkpoint}")

        step("Evaluating on the held-out test split and on the unseen species (taxonet evaluate)")
        from taxonet.evaluate.render import write_report
        from taxonet.evaluate.run import run_evaluation

        report = run_evaluation(result.best_checkpoint, dataset, split="test", unseen_uri=unseen_dataset)
        paths = write_report(report, out / "report")
        report_path = paths.get("report", out / "report")
        print("\n".join(known_summary(report)))

        step(f"Serving the checkpoint with Ray Serve on http://127.0.0.1:{args.port}; classifying over HTTP")
        from ray import serve

        from taxonet.serve.app import app_builder

        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(app_builder({"checkpoint": result.best_checkpoint, "device": "cpu",
                               "ingress": {"num_cpus": 0.25}, "classifier": {"num_cpus": 0.5}}),
                  name="taxonet", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}/v1/classify"
        for path in _pick_images(out / "images") + _pick_images(out / "images-unseen"):
            truth = " > ".join(path.relative_to(path.parents[3]).parts[:3])
            print(f"  {truth}\n      {_describe(_post(url, path))}")

        step("Done")
        print(f"  report: {report_path} (Table 4, confusion matrices with an 'unsure' column, curves)")
        print(f"  checkpoint: {result.best_checkpoint}")
        print(f"  try it: curl -s -H 'Content-Type: image/jpeg' --data-binary @{_pick_images(out / 'images')[0]}"
              f" {url}")
        print(f"\nUnseen species: the answer should be unsure at species and reliable at a correct higher rank "
              f"(chain rule: {config.anomaly.chain_rule})")
        print(unseen_table(report))
        overall = report.unseen.overall
        print(f"known species answered at species: {report.lowest_reliable.get('species', 0.0):.0%}; "
              f"unseen: {overall.unsure_at_leaf:.0%} unsure at species, {overall.correct_higher:.0%} at a correct "
              f"higher rank" + (f"  ({PAPER_LOSS_EXPECTATION})" if args.paper_loss else ""))
        if wait:
            print(f"serving at http://127.0.0.1:{args.port} (OpenAPI at /docs) — press Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
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
