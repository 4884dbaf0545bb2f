"""Elastic training on a real local Ray: with ``train.min_workers`` a run starts on the workers that fit.

The local Ray has 2 CPUs; the run asks for 2 workers of 1.5 CPUs, so only one fits. With a fixed size Ray Train
would wait for the second forever (worker-group start timeouts, retried without end); with ``train.min_workers=1``
(``ScalingConfig(num_workers=(1, 2))``) it starts with one and finishes. The same run decodes on the device path
(``data.decode=gpu`` on the CPU: the DeviceCollator through the product's worker) with ``loader_threads=auto``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taxonet.checkpoint import load_checkpoint
from taxonet.config import load_config
from taxonet.data.prepare import PrepareOptions, write_synthetic_dataset
from taxonet.taxonomy import Taxonomy
from taxonet.train.driver import run_training

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_an_elastic_run_starts_with_the_workers_that_fit(ray_local, tmp_path: Path) -> None:
    dataset = str(tmp_path / "ds")
    write_synthetic_dataset(dataset, Taxonomy.demo(), per_species=12, image_size=32, seed=0,
                            options=PrepareOptions(workers=1, progress=False, shard_size=100, train_size=32))
    config = load_config("demo", {
        "data.dataset": dataset, "data.input_size": 32, "data.decode": "gpu", "train.storage": str(tmp_path / "runs"),
        "train.run_name": "elastic", "optim.epochs": 2, "optim.batch_size": 16, "model.backbone": "small_cnn",
        "train.num_workers": 2, "train.min_workers": 1, "train.cpus_per_worker": 1.5, "train.loader_threads": "auto",
        "train.max_failures": 0,
    })
    result = run_training(config)
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert all(h["images_per_s"] > 0 for h in result.history)
    assert load_checkpoint(result.best_checkpoint).thresholds is not None
