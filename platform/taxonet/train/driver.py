"""The Ray Train driver: a run of :mod:`taxonet.train.worker` on the connected Ray cluster, then its best epoch
completed (anomaly thresholds) into the run's ``best/`` and, when ``registry.uri`` is set, published as the next
version of the model in the registry (and ``registry.promote`` moved to it).

Before any worker starts, the driver fails early on what would fail later: a registry it cannot write to, and a
resume from a checkpoint that does not verify or whose taxonomy or model architecture is not the run's.

Run layout under ``train.storage`` (local directory or ``s3://bucket/prefix``)::

    <run_name>/checkpoint_*/   Ray Train checkpoints (latest + best by val_loss), each a complete taxonet checkpoint
                               plus its resume state (train_state.pt)
    <run_name>/best/           the best epoch with anomaly thresholds and the run's history (evaluate it; serving
                               follows the registry version published from it)
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
import pyarrow.fs
import ray
import ray.data
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from taxonet import registry, storage
from taxonet.checkpoint import materialize, publish_checkpoint, require_compatible
from taxonet.config import RunConfig
from taxonet.data.dataset import DatasetInfo
from taxonet.data.pipeline import Collator, iter_parquet_batches, resolve_loader_threads
from taxonet.data.ray_splits import load_split, read_split
from taxonet.data.transforms import TransformSpec
from taxonet.devices import resolve_device
from taxonet.errors import DatasetError
from taxonet.registry import PublishedRun, RegistryError, check_publish_target, publish_run
from taxonet.taxonomy import Taxonomy
from taxonet.train.loop import Metrics, TrainState, check_resumable, complete_checkpoint
from taxonet.train.worker import checkpoint_uri, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    run_uri: str
    best_checkpoint: str
    metrics: Metrics
    history: list[Metrics]
    resumed_from_epoch: int | None
    #: the registry version published from ``best_checkpoint`` (None when ``registry.uri`` is empty)
    published: PublishedRun | None = None


def run_training(config: RunConfig) -> TrainingResult:
    """Train ``config`` with Ray Train on the connected Ray cluster (``ray.init`` must have been called).

    A rerun with the same ``train.run_name`` and ``train.storage`` resumes from the latest checkpoint, once it
    verifies and fits the run. With ``registry.uri`` the finished run is published (:func:`publish_run`); a failed
    publish raises RegistryError after training, the run's ``best/`` kept.
    """
    if not config.data.dataset:
        raise DatasetError("data.dataset is not set: give the prepared dataset URI (--set data.dataset=URI)")
    info = DatasetInfo.load(config.data.dataset)
    check_publish_target(config)
    storage_path, filesystem = _storage_for_ray(config.train.storage)
    _check_resume(config, info.taxonomy, storage_path, filesystem)
    if config.model.init_from:  # fail here, before any worker starts, when the fine-tune source does not fit
        require_compatible(registry.resolve(config.model.init_from).uri, config, info.taxonomy,
                           action="fine-tune from")
    # one progress bar per split and epoch from Ray Data's coordinators drowns the per-epoch summary lines
    ray.data.DataContext.get_current().enable_progress_bars = bool(os.environ.get("TAXONET_DATA_PROGRESS"))
    datasets = {}
    for name, split in (("train", config.data.train_split), ("val", config.data.val_split)):
        if _cache_split(config.data.cache, sum(s.bytes for s in info.shards_for(split))):
            # read once, here, into the object store; every epoch then iterates over the blocks in memory
            datasets[name] = load_split(config.data.dataset, split)
        else:
            # Reading is light (decode happens in the workers' Collator): a fractional CPU per read task lets reads
            # run even when the training workers hold every CPU of a node.
            datasets[name] = read_split(config.data.dataset, split, num_cpus=0.25)
    run_uri = storage.join(config.train.storage, config.train.run_name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "taxonomy": info.taxonomy},
        scaling_config=scaling_config(config),
        run_config=RayRunConfig(
            name=config.train.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    history = _history(result, config.train.storage)
    start_epoch = int((result.metrics or {}).get("start_epoch", 0))
    best_checkpoint, best_metrics = min(result.best_checkpoints or [(result.checkpoint, result.metrics)],
                                        key=lambda pair: pair[1].get("val_loss", math.inf))
    best_source = checkpoint_uri(best_checkpoint, config.train.storage)
    best_uri = storage.join(run_uri, "best")
    if config.train.use_gpu:  # one pass over the training split: worth a GPU task on the cluster
        remote = ray.remote(publish_best).options(num_cpus=config.train.cpus_per_worker, num_gpus=1)
        ray.get(remote.remote(config, best_source, best_uri, history))
    else:  # on CPU the driver does it itself (no extra scheduling round trip)
        publish_best(config, best_source, best_uri, history)
    log.info("training finished in %.0f s; best checkpoint %s", time.time() - started, best_uri)
    try:
        published = publish_run(best_uri, config)
    except RegistryError as exc:
        raise RegistryError(f"training finished and its best checkpoint {best_uri} is kept, but publishing it "
                            f"failed: {exc}") from exc
    if published is not None:
        log.info("published %s%s", published.reference,
                 f"; {published.to_dict()['alias_reference']} points at it" if published.alias else "")
    return TrainingResult(run_uri=run_uri, best_checkpoint=best_uri, metrics=dict(best_metrics), history=history,
                          resumed_from_epoch=start_epoch if start_epoch > 0 else None, published=published)


def scaling_config(config: RunConfig) -> ScalingConfig:
    """Ray Train's ScalingConfig of a run: ``train.num_workers`` workers, or elastic between ``train.min_workers``
    and ``num_workers``; each with ``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs (when ``use_gpu``) and the
    extra ``train.resources_per_worker`` (custom node resources)."""
    train = config.train
    resources = {"CPU": train.cpus_per_worker, **train.resources_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    minimum = train.num_workers if train.min_workers is None else train.min_workers
    workers: int | tuple[int, int] = train.num_workers if minimum == train.num_workers else (minimum,
                                                                                              train.num_workers)
    return ScalingConfig(num_workers=workers, use_gpu=train.use_gpu, resources_per_worker=resources)


def publish_best(config: RunConfig, source_uri: str, best_uri: str, history: list[Metrics]) -> int:
    """Complete the best epoch's checkpoint (:func:`taxonet.train.loop.complete_checkpoint`: thresholds fitted on the
    training split, the run's history) and publish it to ``best_uri``; returns the number of thresholds.

    Runs as a Ray task on a GPU when training used one. The published directory's manifest is written last and the
    old one removed first, so a reader sees either the previous best checkpoint or the new one.
    """
    device = resolve_device("cuda" if config.train.use_gpu and torch.cuda.is_available() else "cpu")
    info = DatasetInfo.load(config.data.dataset)
    collate = Collator(info.taxonomy, TransformSpec.from_config(config.data), train=False,
                       threads=resolve_loader_threads(config.train.loader_threads, config.train.cpus_per_worker))
    raw = iter_parquet_batches(config.data.dataset, config.data.train_split, max(config.optim.batch_size, 64),
                               shuffle=False)
    with tempfile.TemporaryDirectory(prefix="taxonet-best-") as tmp:
        # a new directory: a local Ray checkpoint keeps its resume state for a later rerun
        source = materialize(source_uri, Path(tmp) / "download")
        thresholds = complete_checkpoint(source, Path(tmp) / "best", (collate(batch) for batch in raw), device=device,
                                         history=history)
        publish_checkpoint(Path(tmp) / "best", best_uri)
    return len(thresholds.rows)


def _cache_split(mode: str, split_bytes: int) -> bool:
    """Whether to keep a split in the object store: ``mode`` "auto" caches a split whose Parquet bytes (encoded
    images: the blocks hold them as they are) fit in a quarter of the cluster's object store."""
    if mode != "auto":
        return mode == "always"
    capacity = float(ray.cluster_resources().get("object_store_memory", 0.0))
    cached = split_bytes <= 0.25 * capacity
    log.info("data.cache=auto: %s a split of %.1f MB (object store %.1f MB)", "caching" if cached else "streaming",
             split_bytes / 1e6, capacity / 1e6)
    return cached


def _storage_for_ray(uri: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train: S3 gets an explicit pyarrow filesystem (custom endpoint)."""
    if storage.is_s3(uri):
        filesystem, path = storage.pyarrow_filesystem(uri)
        return path, filesystem
    local = os.path.abspath(uri.removeprefix("file://"))
    os.makedirs(local, exist_ok=True)
    return local, None


def _check_resume(config: RunConfig, taxonomy: Taxonomy, storage_path: str,
                  filesystem: pyarrow.fs.FileSystem | None) -> None:
    """If Ray Train will resume this run (an earlier run of the same name checkpointed), check its latest checkpoint
    now: it must verify (manifest, every hash) and match the run's taxonomy and model architecture. The workers
    check again what they load (a retry may resume from a later checkpoint)."""
    try:
        previous = ray.train.Result.from_path(f"{storage_path.rstrip('/')}/{config.train.run_name}",
                                              storage_filesystem=filesystem)
    except RuntimeError as exc:  # no run of this name yet (or none that Ray Train recorded): a fresh start
        log.debug("no earlier run to resume: %s", exc)
        return
    if previous.checkpoint is None:
        return
    uri = checkpoint_uri(previous.checkpoint, config.train.storage)
    log.info("run %s exists: checking its latest checkpoint %s before resuming", config.train.run_name, uri)
    check_resumable(uri, config, taxonomy)


def _history(result: ray.train.Result, storage_uri: str) -> list[Metrics]:
    """Per-epoch metrics of the whole run (including epochs before a resume), from the latest checkpoint."""
    if result.checkpoint is None:  # nothing was checkpointed: the last report is all there is
        return [dict(result.metrics)] if result.metrics else []
    return TrainState.load(checkpoint_uri(result.checkpoint, storage_uri)).history


__all__ = ["TrainingResult", "publish_best", "run_training", "scaling_config"]
