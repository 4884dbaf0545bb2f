"""The review loop end to end on synthetic data, everything on S3 (moto's server) and real Ray Serve over HTTP.

A model trained without one species ("Apidae sp. novum 1") is served with the review queue on; images of that
species are sent with a source header; they land in the queue on S3 (unsure answers as "unsure", the others as
audits: the small CPU model of this test, trained with the paper's loss, is unsure about only a few percent of an
unseen species' images — docs/evaluation.md measures this and how outlier exposure raises it, at a training cost
this test cannot pay); a reviewer labels them "new
species in Apidae" (decisions written with the records contract, as the review API writes them); ``taxonet prepare
--add-reviewed`` makes the next dataset; the product's training loop trains the next version (in this process: the
Ray Train path is tested in tests/integration); ``taxonet models compare`` passes the
gate and promotes it; served again, the new version names the species, reliably, for most of its fresh images.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from taxonet import registry, storage
from taxonet.cli import main
from taxonet.config import load_config
from taxonet.data.dataset import DatasetInfo
from taxonet.data.pipeline import Collator, iter_parquet_batches
from taxonet.data.transforms import TransformSpec
from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset
from taxonet.data.synthetic import SyntheticInsects, unseen_species
from taxonet.review import records
from taxonet.review.records import Decision
from taxonet.taxonomy import Taxonomy
from tests.serve.helpers import serve_on_free_port
from tests.support import TensorData, train_locally

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SIZE = 40
#: both versions train with one recipe, pinned here (the demo config's defaults move with the demo; this test keeps the
#: recipe it was measured with): small_cnn at 40 px, Adam 3e-3 cosine, 16 epochs, the paper's loss (dependency
#: "paper", no outlier exposure), the strict chain rule. Version 2 cannot fine-tune from version 1 (model.init_from
#: needs the same taxonomy; the new class changes it), so it is a full run. Measured with the demo's current recipe
#: (Adam 5e-4, soft dependency, outlier weight 0.35, 10 epochs) the gap was 0.58 -> 0.25 species macro F1, and with
#: Adam 1e-3 16 epochs 0.68 -> 0.38: the gate refused version 2 at 0.2
EPOCHS = 16
LR = 3e-3
OUTLIER_WEIGHT = 0.0
DEPENDENCY = "paper"
#: macro F1 the new version may lose on known species: the test split holds 10 images per species (90) and both
#: versions are tiny. Measured (2026-12-01, 2-core CPU box, no GPU) with this recipe: order 0.86 -> 0.71, family
#: 0.74 -> 0.57, species 0.43 -> 0.32 (largest loss 0.17, family) — 0.2 leaves 0.03 for another machine's float
#: rounding; the gate's default 0.02 is for real models and test splits; that the gate refuses a worse model is
#: tests/review/test_compare.py
TOLERANCE = "0.2"
PREFIX = "/loop"
#: the new version must answer the new species at species rank, correctly and reliably, for most of its fresh images
#: (measured on a 2-core box, 2026-12-01, with this recipe: 0.75 of 40; 0.62 with 10 epochs — docs/review.md)
MIN_SPECIES_SHARE = 0.5
#: images of the new species sent to the old version (all queued: see the test)
NOVEL_IMAGES = 48


def jpeg(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture()
def serve_http(ray_local: None) -> Iterator[str]:
    with serve_on_free_port() as url:
        yield url


def recipe(dataset: str):
    return load_config("demo", {
        "data.dataset": dataset, "data.input_size": SIZE, "model.backbone": "small_cnn", "optim.epochs": EPOCHS,
        "optim.name": "adam", "optim.lr": LR, "optim.schedule": "cosine", "optim.batch_size": 32,
        "loss.outlier_weight": OUTLIER_WEIGHT, "loss.dependency": DEPENDENCY, "anomaly.chain_rule": "strict",
        "train.seed": 0})


def train_from_dataset(dataset: str, out: Path) -> Path:
    """A version trained in this process with the product's loop (:func:`taxonet.train.loop.fit`, as the Ray Train
    worker runs it, then the thresholds), from a dataset's train and val splits."""
    config = recipe(dataset)
    info = DatasetInfo.load(dataset)
    collate = Collator(info.taxonomy, TransformSpec.from_config(config.data), train=False)

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [collate(raw) for raw in iter_parquet_batches(dataset, split, 64, shuffle=False)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    data = TensorData(*tensors("train"), *tensors("val"), batch_size=config.optim.batch_size, seed=0)
    return train_locally(config, info.taxonomy, data, out, device="cpu")[0]


def deploy(checkpoint: str, queue: str, audit_rate: float) -> None:
    from ray import serve

    from taxonet.serve.app import app_builder

    small = {"num_cpus": 0.25, "autoscaling": None, "num_replicas": 1}
    args = {"checkpoint": checkpoint, "graph": False, "ingress": small, "classifier": {**small, "access_log": False},
            "review_queue": {"uri": queue, "audit_rate": audit_rate, "batch_size": 16, "flush_interval_s": 1.0}}
    serve.run(app_builder(args), name="loop", route_prefix=PREFIX)


def classify_all(client: httpx.Client, images: list[bytes], source: str) -> list[dict]:
    answers = []
    for data in images:
        response = client.post("/v1/classify", content=data,
                               headers={"content-type": "image/jpeg", "x-taxonet-source": source})
        assert response.status_code == 200, response.text
        answers.append(response.json()["predictions"][0])
    return answers


def wait_for_queue(queue: str, expected: set[str], timeout: float = 120.0) -> list[records.QueueItem]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            items = records.read_queue(queue)
        except FileNotFoundError:
            items = []
        if {item.crop_id for item in items} >= expected:
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(expected - {i.crop_id for i in items})} unsure crops never reached {queue}")
        time.sleep(0.5)


@pytest.mark.timeout(1500)
def test_unsure_crops_reviewed_as_a_new_species_become_a_class_of_the_next_version(
        tmp_path: Path, s3_bucket: str, serve_http: str, capsys: pytest.CaptureFixture) -> None:
    root = f"s3://{s3_bucket}"
    queue, labels, models = f"{root}/review/queue", f"{root}/review/labels", f"{root}/models"
    base, dataset = f"{root}/datasets/v1", f"{root}/datasets/v2"
    demo = Taxonomy.demo()
    novel = next(chain for chain in unseen_species(demo) if chain[1] == "Apidae")
    generator = SyntheticInsects(demo, image_size=SIZE, seed=0)

    # version 1: trained without the novel species, in the registry as production, served with the queue on
    # a quarter of the known images for the test split (10 per species): the gate compares on it
    write_synthetic_dataset(base, demo, per_species=40, image_size=SIZE,
                            options=PrepareOptions(workers=1, progress=False, test_fraction=0.25))
    old = train_from_dataset(base, tmp_path / "v1")
    registry.promote(models, "insects", registry.publish(old, models, "insects"), "production")
    # every answer is queued: the unsure ones as "unsure", the sure ones as an audit (audit_rate 1: a small CPU model
    # trained with the paper's loss is sure of a wrong sibling for most images of an unseen species — see the module
    # docstring — so the reviewer needs the audited crops too)
    deploy(registry.resolve(f"{models}/insects@production").uri, queue, audit_rate=1.0)

    novel_images = [jpeg(s.image) for s in generator.samples(NOVEL_IMAGES, chains=[novel], start_index=1000)]
    known_images = [jpeg(s.image) for s in generator.samples(2, start_index=1000)]
    with httpx.Client(base_url=serve_http + PREFIX, timeout=120) as client:
        answers = classify_all(client, novel_images + known_images, "trap-7")
    reasons = {hashlib.sha256(data).hexdigest(): "audit" if answer["lowest_reliable_rank"] == "species" else "unsure"
               for data, answer in zip(novel_images + known_images, answers)}
    novel_ids = {hashlib.sha256(data).hexdigest() for data in novel_images}
    unsure_share = sum(reasons[c] == "unsure" for c in novel_ids) / len(novel_ids)

    # all of them land on S3, each with the reason the policy gave it, the answer, the model and the source
    items = wait_for_queue(queue, set(reasons))
    assert {item.crop_id: item.reason for item in items} == reasons
    assert all(item.source == "trap-7" and item.model_version == "1" for item in items)
    assert all(item.answer_dict()["lowest_reliable_rank"] == item.lowest_reliable_rank for item in items)

    # a reviewer: the novel species' crops are "new species in Apidae"; the known ones get their species
    truth = {hashlib.sha256(data).hexdigest(): sample.labels
             for data, sample in zip(known_images, generator.samples(2, start_index=1000))}
    for item in items:
        if item.crop_id in novel_ids:
            decision = Decision(item.crop_id, "expert-1", "new_species", rank="family", parent="Apidae",
                                provisional="Apidae sp. A")
        else:
            decision = Decision(item.crop_id, "expert-1", "taxon", rank="species", taxon=truth[item.crop_id][-1])
        records.write_decision(labels, decision)

    # the next dataset: base + reviewed crops, the provisional species a class
    assert main(["prepare", "--add-reviewed", labels, "--queue", queue, base, dataset, "--min-new-species", "8",
                 "--no-progress", "--workers", "0"]) == 0
    info = DatasetInfo.load(dataset)
    assert ("species", "Apidae sp. A") in info.taxonomy
    assert info.metadata["review"]["batches"] == records.list_queue_batches(queue)

    # version 2: a full run (the taxonomy changed: model.init_from cannot apply) with the same recipe and loop as
    # version 1, published to the registry
    new = train_from_dataset(dataset, tmp_path / "v2")
    version = registry.publish(new, models, "insects")

    # the gate: not worse on known species, better on the reviewed crops held out from training → promoted
    capsys.readouterr()
    code = main(["models", "compare", f"{models}/insects@production", f"{models}/insects@{version}",
                 "--dataset", dataset, "--tolerance", TOLERANCE, "--promote", "production", "--allow-taxonomy-change",
                 "--json"])
    comparison = json.loads(capsys.readouterr().out)
    print(json.dumps(comparison, indent=1))
    assert code == 0 and comparison["passed"], comparison["reasons"]
    assert registry.read_alias(models, "insects", "production").version == version

    # served again: the new version names the species for most of its fresh images
    deploy(registry.resolve(f"{models}/insects@production").uri, queue, audit_rate=0.0)
    fresh = [jpeg(s.image) for s in generator.samples(40, chains=[novel], start_index=5000)]
    with httpx.Client(base_url=serve_http + PREFIX, timeout=120) as client:
        answers = classify_all(client, fresh, "trap-7")
    named = sum(a["lowest_reliable_rank"] == "species" and a["lowest_reliable_label"] == "Apidae sp. A"
                for a in answers) / len(answers)
    print(f"version 1 was unsure on {unsure_share:.2f} of the new species' images; version 2 names the species "
          f"reliably for {named:.2f} of fresh images")
    assert named >= MIN_SPECIES_SHARE

    # queue, labels, datasets and models are all on S3
    for prefix in ("review/queue/batches", "review/labels/decisions", "datasets/v1", "datasets/v2",
                   "models/insects/versions"):
        assert storage.list_files(f"{root}/{prefix}"), prefix
