"""docs/scaling.md's figures come from tests/bench/scaling_model.py: its arithmetic and counts, checked."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scaling_model.py"


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("scaling_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_parameter_counts_match_torchvision(model) -> None:
    size = model.count("resnet50", {"order": 4, "family": 5, "species": 9}, "demo")
    # torchvision's ResNet50 has 25,557,032 parameters, 2,049,000 of them in the 1000-class fc layer taxonet drops
    assert size.backbone_params == 25_557_032 - 2_049_000
    # three heads of 2048 → 512 → classes
    assert size.head_params == sum(2048 * 512 + 512 + 512 * n + n for n in (4, 5, 9))
    assert size.gradient_bytes() == 4 * size.params and size.gradient_bytes(2) == 2 * size.params


def test_ring_allreduce_time(model) -> None:
    one_bucket = 10 * 2**20
    # 2 (n-1)/n × S / busbw + 2 (n-1) × alpha per bucket
    assert model.ring_time(one_bucket, 4, 100.0, 1e-5) == pytest.approx(1.5 * one_bucket / 100e9 + 6e-5)
    assert model.ring_time(one_bucket, 1, 100.0, 1e-5) == 0.0
    # bandwidth term saturates at 2 S / busbw; the latency term keeps growing with the ring
    big = 100 * 2**20
    assert model.ring_time(big, 1024, 1.0, 0.0) < 2 * big / 1e9
    assert model.ring_time(big, 64, 1.0, 1e-4) > model.ring_time(big, 8, 1.0, 1e-4)


def test_multi_node_time_is_set_by_the_slower_phase(model) -> None:
    fabric = model.Fabric("8-GPU nodes", 8, 450.0, 10.0, 5e-6, 5e-5, 4096)
    size = 100e6
    inside = model.allreduce_time(size, 8, fabric)
    across = model.allreduce_time(size, 32, fabric)  # 4 nodes
    assert inside == pytest.approx(model.ring_time(size, 8, 450.0, 5e-6))
    assert across == pytest.approx(model.ring_time(size, 4, 10.0, 5e-5))
    assert across > inside


def test_step_efficiency_and_nic_load(model) -> None:
    fabric = model.Fabric("1 GPU per node", 1, 450.0, 1.0, 0.0, 0.0, 4096)  # 1 GB/s between nodes
    single = model.step(100e6, 1, fabric, batch=100, img_s=1000.0, bytes_per_image=10e3, overlap=0.5)
    assert single.efficiency == 1.0 and single.exposed_s == 0.0
    assert single.nic_gbs == pytest.approx(100 * 10e3 / 0.1 / 1e9)  # only its S3 reads
    two = model.step(100e6, 2, fabric, batch=100, img_s=1000.0, bytes_per_image=10e3, overlap=0.5)
    # 100 MB over 1 GB/s between 2 nodes: 0.1 s; half of the 2/3 × 0.1 s backward hides 1/30 s of it
    assert two.comm_s == pytest.approx(0.1)
    assert two.exposed_s == pytest.approx(0.1 - 0.1 / 3)
    assert two.efficiency == pytest.approx(0.1 / (0.1 + two.exposed_s))
    assert math.isclose(two.nic_gbs, (100 * 10e3 + 100e6) / (0.1 + two.exposed_s) / 1e9)


def test_jpeg_sizes_grow_with_the_side(model) -> None:
    sizes = model.jpeg_sizes([64, 128], quality=90, samples=3)
    for by_side in sizes.values():
        assert 0 < by_side[64] < by_side[128]
