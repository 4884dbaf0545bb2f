"""Serving feeds the review page's look-alike groups: real Serve over HTTP with the review queue on S3 (moto's server),
then the review API over HTTP on the queue serving wrote.

A small model is served with every answer queued (``audit_rate`` 1); four look-alike crops of one insect (as a trap
camera takes a few frames of one visitor: the same image flipped, brightened, re-framed) and a crop of an insect of
another order are sent. Each queued record carries the model's embedding (small_cnn's 256 features projected to 128,
unit norm) while no answer to the client does; the review API offers the four as one group and not the fifth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from ray import serve

from taxonet.data.synthetic import SyntheticInsects
from taxonet.review import records
from taxonet.serve.predictor import EMBEDDING_MAX_DIMS
from taxonet.taxonomy import Taxonomy
from tests.review.review_support import serving, session

from .helpers import SMALL, deploy, encode, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "taxonet-review-embeddings"
PREFIX = "/embed"
#: the insect with look-alikes, and one of another order: this recipe's features put the look-alikes above the review
#: page's cosine 0.9 and the other insect well below it (the test asserts both through the review API)
SPECIES = "Bombus terrestris"
OTHER = "Coccinella septempunctata"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_cnn (256 features: the embedding is projected) trained for 8 epochs at 40 px: features that tell
    insects apart (the package's 2-epoch tiny_cnn is too weak for that: its crops of different orders often have
    cosines above 0.9 — tests/bench/embedding_geometry.py prints both)."""
    from tests.support import quick_checkpoint

    return quick_checkpoint(tmp_path_factory.mktemp("embed-ckpt"), image_size=40, epochs=8, backbone="small_cnn")


@pytest.fixture()
def queued_app(serve_http: str, model: Path, s3_bucket: str) -> Iterator[tuple[str, str]]:
    """The app with the review queue on (every answer queued); yields (its base URL, the queue's URI)."""
    queue = f"s3://{s3_bucket}/review/queue"
    deploy({"checkpoint": str(model), "max_batch_size": 8, "ingress": SMALL,
            "classifier": {**SMALL, "access_log": False},
            "review_queue": {"uri": queue, "audit_rate": 1.0, "batch_size": 16, "flush_interval_s": 1.0}},
           name=APP, route_prefix=PREFIX)
    try:
        yield serve_http + PREFIX, queue
    finally:
        serve.delete(APP)


def crops() -> tuple[list[bytes], bytes]:
    demo = Taxonomy.demo()
    generator = SyntheticInsects(demo, image_size=64, seed=0)
    chain = demo.chain_names("species", demo.index("species", SPECIES))
    base = generator.render(chain, 20_000)
    alike = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ImageEnhance.Brightness(base).enhance(1.1),
             base.crop((2, 2, 62, 62)).resize((64, 64))]
    other = generator.render(demo.chain_names("species", demo.index("species", OTHER)), 20_000)
    return [encode(image, quality=90) for image in alike], encode(other, quality=90)


@pytest.mark.timeout(900)
def test_served_crops_carry_embeddings_and_look_alikes_are_grouped(queued_app: tuple[str, str],
                                                                   tmp_path: Path) -> None:
    url, queue = queued_app
    alike, other = crops()
    with httpx.Client(base_url=url, timeout=120) as client:
        # three in one multipart request, two as raw bodies: both ways reach the queue with their embeddings
        several = client.post("/v1/classify", files=[("files", (f"{i}.jpg", data, "image/jpeg"))
                                                     for i, data in enumerate(alike[:3])])
        assert several.status_code == 200, several.text
        bodies = [several.text]
        for data in (alike[3], other):
            single = client.post("/v1/classify", content=data, headers={"content-type": "image/jpeg"})
            assert single.status_code == 200, single.text
            bodies.append(single.text)
        assert "embedding" not in client.get("/openapi.json").text
    assert not any("embedding" in body for body in bodies)  # answers to clients never carry it

    ids = [hashlib.sha256(data).hexdigest() for data in alike]
    other_id = hashlib.sha256(other).hexdigest()

    def queued() -> dict[str, records.QueueItem] | None:
        try:
            items = {item.crop_id: item for item in records.read_queue(queue)}
        except FileNotFoundError:
            return None
        return items if set(items) >= {*ids, other_id} else None

    items = wait_for(queued, timeout=180, what="the five crops on the queue")
    vectors = {crop: np.asarray(items[crop].embedding, dtype=np.float32) for crop in (*ids, other_id)}
    for crop, vector in vectors.items():
        assert vector.shape == (EMBEDDING_MAX_DIMS,), (crop, vector.shape)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=2e-3)

    # the review API over the queue serving wrote: the look-alikes come as one group, the other insect alone
    with serving(queue, str(tmp_path / "labels")) as review:
        ana = session("ana")
        shown = ana.get(f"{review}/api/next", params={"limit": 12}).json()["crops"]  # as the page starts
        look_alikes = {crop["crop_id"]: set(crop["similar"]) for crop in shown}
        assert look_alikes[ids[0]] == set(ids[1:]) and look_alikes[other_id] == set(), look_alikes
        group = ana.get(f"{review}/api/crops/{ids[0]}/similar").json()["crops"]
        assert {crop["crop_id"] for crop in group} == set(ids), [(c["crop_id"], c.get("cosine")) for c in group]
        assert all(crop["cosine"] >= 0.9 for crop in group[1:])
        alone = ana.get(f"{review}/api/crops/{other_id}/similar").json()["crops"]
        assert [crop["crop_id"] for crop in alone] == [other_id]
