"""Evaluate, the in-process predictor and the HTTP answer of a real Ray Serve agree on the lowest reliable rank of
the same images, under the strict chain rule (the default) and the lenient one (issue 15).

The rule travels with the thresholds in the checkpoint (``anomaly.chain_rule``), so nothing is passed to serving.
The model is an untrained tiny CNN: its winners at the three ranks are close to random, so many predicted chains
break the taxonomy and the two rules give different answers on the same images — which the test checks first, so
that the agreement below is not an agreement on cases where the rules coincide. Starts Ray: run under the lock.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taxonet import storage
from taxonet.anomaly import AnomalyThresholds
from taxonet.checkpoint import add_thresholds, load_checkpoint
from taxonet.data.dataset import DatasetInfo
from taxonet.data.prepare import PrepareOptions, prepare_dataset
from taxonet.data.synthetic import SyntheticInsects, write_image_folder
from taxonet.evaluate.report import UNSURE
from taxonet.evaluate.run import run_evaluation
from taxonet.serve.predictor import Predictor
from taxonet.taxonomy import Taxonomy
from tests.checkpoint_support import tiny_checkpoint
from tests.serve.helpers import serve_on_free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("agree")
    taxonomy = Taxonomy.demo()
    write_image_folder(root / "images", SyntheticInsects(taxonomy, image_size=48, seed=3).samples(10))
    options = PrepareOptions(overwrite=True, max_side=64, test_fraction=0.5, val_fraction=0.1, progress=False,
                             workers=1)
    return prepare_dataset(str(root / "images"), str(root / "dataset"), taxonomy=taxonomy, options=options).info.uri


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same untrained model twice: thresholds with chain_rule strict, and with lenient."""
    out = {}
    for rule in ("strict", "lenient"):
        directory = tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{rule}"), seed=1)
        thresholds = load_checkpoint(str(directory)).thresholds
        assert thresholds is not None
        # τ at the median-ish winning logit of a random model: a mix of sure and unsure at every rank
        rows = [replace(row, threshold=0.05) for row in thresholds.rows]
        add_thresholds(directory, AnomalyThresholds(rows, k=thresholds.k, chain_rule=rule))
        assert load_checkpoint(str(directory)).thresholds.chain_rule == rule
        out[rule] = directory
    return out


def _test_images(dataset: str) -> list[bytes]:
    info = DatasetInfo.load(dataset)
    images: list[bytes] = []
    for shard in info.shards_for("test"):
        data = pa.BufferReader(storage.read_bytes(storage.join(dataset, shard.path)))
        images += [bytes(v) for v in pq.read_table(data, columns=["image"]).column("image").to_pylist()]
    return images


def _shares(answers: list[dict], ranks: tuple[str, ...]) -> dict[str, float]:
    counts = Counter(answer["lowest_reliable_rank"] or UNSURE for answer in answers)
    return {key: counts.get(key, 0) / len(answers) for key in (*ranks, UNSURE)}


@pytest.fixture(scope="module")
def serve_url(ray_local: None) -> Iterator[str]:
    with serve_on_free_port() as url:
        yield url


def _answers(predictor: Predictor, images: list[bytes]) -> list[dict]:
    """The in-process answers as the JSON the API sends."""
    return [answer.to_dict() for answer in predictor.predict_bytes(images)]


def _post(url: str, image: bytes) -> dict:
    request = urllib.request.Request(url, data=image, headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=120) as response:
        (answer,) = json.loads(response.read())["predictions"]
    return answer


def test_rules_differ_on_these_images(dataset: str, checkpoints: dict[str, Path]) -> None:
    images = _test_images(dataset)
    strict = _answers(Predictor.from_checkpoint(str(checkpoints["strict"]), device="cpu"), images)
    lenient = _answers(Predictor.from_checkpoint(str(checkpoints["lenient"]), device="cpu"), images)
    broken = [a for a in strict if not a["consistent"]]
    assert len(broken) >= 5, "the untrained model should break the taxonomy on several images"
    assert all(a["lowest_reliable_rank"] is None for a in broken)
    differ = sum(s["lowest_reliable_rank"] != le["lowest_reliable_rank"] for s, le in zip(strict, lenient))
    assert differ >= 3


@pytest.mark.parametrize("rule", ["strict", "lenient"])
def test_evaluate_predictor_and_http_agree(rule: str, dataset: str, checkpoints: dict[str, Path],
                                           serve_url: str) -> None:
    from ray import serve

    from taxonet.serve.app import app_builder

    checkpoint = str(checkpoints[rule])
    images = _test_images(dataset)
    taxonomy = Taxonomy.demo()
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    in_process = _answers(predictor, images)
    serve.run(app_builder({"checkpoint": checkpoint, "device": "cpu", "ingress": {"num_cpus": 0.1},
                           "classifier": {"num_cpus": 0.1}}), name=f"agree-{rule}", route_prefix=f"/{rule}")
    try:
        over_http = [_post(f"{serve_url}/{rule}/v1/classify", image) for image in images]
    finally:
        serve.delete(f"agree-{rule}")
    for local, remote in zip(in_process, over_http):
        assert remote["lowest_reliable_rank"] == local["lowest_reliable_rank"]
        assert remote["lowest_reliable_label"] == local["lowest_reliable_label"]
        assert remote["consistent"] == local["consistent"]
    report = run_evaluation(checkpoint, dataset, split="test", device="cpu")
    assert report.images == len(images)
    assert report.lowest_reliable == pytest.approx(_shares(in_process, taxonomy.ranks), abs=1e-9)
    # under the strict rule no broken chain is reported at any rank
    if rule == "strict":
        assert all(a["lowest_reliable_rank"] is None for a in in_process if not a["consistent"])
    else:
        assert any(a["lowest_reliable_rank"] is not None for a in in_process if not a["consistent"])
    assert np.isclose(sum(report.lowest_reliable.values()), 1.0)
