"""The ScalingConfig a run asks Ray Train for: fixed or elastic worker count, CPU/GPU and custom resources per worker.

Builds Ray's ScalingConfig object only (imports ray.train; starts no Ray)."""

from __future__ import annotations

import pytest

from taxonet.config import load_config
from taxonet.data.pipeline import resolve_loader_threads
from taxonet.train.driver import scaling_config

pytestmark = pytest.mark.unit


def test_a_fixed_size_by_default() -> None:
    scaling = scaling_config(load_config("demo", ["train.num_workers=3", "train.cpus_per_worker=2"]))
    assert scaling.num_workers == 3 and not scaling.elasticity_enabled
    assert scaling.resources_per_worker == {"CPU": 2.0}
    assert scaling_config(load_config("demo", ["train.num_workers=3", "train.min_workers=3"])).num_workers == 3


def test_min_workers_make_the_run_elastic() -> None:
    scaling = scaling_config(load_config("demo", ["train.num_workers=4", "train.min_workers=2"]))
    assert scaling.num_workers == (2, 4) and scaling.elasticity_enabled
    assert (scaling.min_workers, scaling.max_workers) == (2, 4)


def test_resources_per_worker_are_merged_with_cpu_and_gpu() -> None:
    config = load_config("resnet50_mtl", ["train.resources_per_worker={node_b: 0.5, 'accelerator_type:H100': 0.001}",
                                          "train.gpus_per_worker=1"])
    scaling = scaling_config(config)
    assert scaling.resources_per_worker == {"CPU": 8.0, "GPU": 1.0, "node_b": 0.5, "accelerator_type:H100": 0.001}
    assert scaling.use_gpu


def test_loader_threads_auto_follow_the_workers_cpus() -> None:
    assert resolve_loader_threads("auto", 7.5) == 7
    assert resolve_loader_threads("auto", 0.5) == 1
    assert resolve_loader_threads(3, 16) == 3
