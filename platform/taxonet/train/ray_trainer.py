"""Ray Train glue: the multitask training of ``taxonet.engine`` spread over Ray Train workers (DDP).

Thin by design: data arrives as Ray Data shards of raw rows, is decoded in the worker by the pipeline's
:class:`~taxonet.data.pipeline.Collator`, and the epoch body is :func:`taxonet.engine.train_one_epoch`. Ray lines:
the trainer set-up (:func:`run_training`), ``prepare_model``, ``get_dataset_shard``, ``get_checkpoint`` and
``report``.

Run layout under ``train.storage`` (local directory or ``s3://bucket/prefix``)::

    <run_name>/checkpoint_*/   Ray Train checkpoints (latest + best by val_loss), each a complete taxonet checkpoint
    <run_name>/best/           the best checkpoint with anomaly thresholds: what `taxonet serve` loads
    <run_name>/history.json    per-epoch metrics
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Fault injection for tests and drills: "EPOCH:MARKER_FILE" makes worker rank 0 die once during EPOCH
#: (the marker file records that it happened, so the retried run goes on).
FAIL_ONCE_ENV = "TAXONET_FAIL_ONCE_AT_EPOCH"


@dataclass
class TrainingResult:
    run_uri: str
    best_checkpoint: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    resumed_from_epoch: int | None


def _join(base: str, *parts: str) -> str:
    from taxonet import storage

    return storage.join(base, *parts)


def _storage_for_ray(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: S3 gets an explicit pyarrow filesystem (custom endpoint)."""
    from taxonet import storage

    if storage.is_s3(uri):
        filesystem, path = storage.pyarrow_filesystem(uri)
        return path, filesystem
    local = os.path.abspath(uri.removeprefix("file://"))
    os.makedirs(local, exist_ok=True)
    return local, None


def _checkpoint_registered(run_uri: str, epoch: int) -> bool:
    """Whether Ray Train's controller has registered the checkpoint reported for ``epoch``: it records every
    registered checkpoint, with its metrics, in ``checkpoint_manager_snapshot.json`` in the run directory."""
    from taxonet import storage

    try:
        snapshot = json.loads(storage.read_bytes(_join(run_uri, "checkpoint_manager_snapshot.json")))
    except Exception:  # not written yet (or being replaced): not registered as far as we can tell
        return False
    return any((result.get("metrics") or {}).get("epoch") == epoch
               for result in snapshot.get("checkpoint_results", []))


def _maybe_inject_failure(epoch: int, spec: str | None, run_uri: str | None = None) -> None:
    spec = spec or os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if epoch == int(at) and not os.path.exists(marker):
        # Ray Train registers a reported checkpoint when its controller next polls the workers (every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default, later on a loaded machine): a crash before that also
        # loses the epoch just reported. The drill tests the guarantee for a crash mid-epoch, so it waits until the
        # previous epoch's checkpoint is registered (at most a minute) before crashing.
        deadline = time.monotonic() + 60.0
        while run_uri and epoch > 0 and not _checkpoint_registered(run_uri, epoch - 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        Path(marker).write_text(f"failed at epoch {epoch}\n")
        log.error("injected failure at epoch %d (%s)", epoch, FAIL_ONCE_ENV)
        os._exit(1)  # a hard crash, as an OOM kill or a lost node would look to Ray


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from taxonet import engine
    from taxonet.checkpoint import save_checkpoint
    from taxonet.config import from_dict
    from taxonet.data.pipeline import Collator
    from taxonet.data.transforms import TransformSpec
    from taxonet.losses import build_loss
    from taxonet.models import build_model
    from taxonet.taxonomy import Taxonomy

    config = from_dict(loop_config["config"])
    taxonomy = Taxonomy.from_dict(loop_config["taxonomy"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    engine.set_seed(config.train.seed + rank)
    device = get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = build_model(config.model, taxonomy)
    start_epoch, best_loss, history = 0, math.inf, []
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume (rerun with the same name, or a retry after a worker failure)
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            train_state = torch.load(Path(directory) / "train_state.pt", map_location="cpu", weights_only=True)
        start_epoch = int(train_state["epoch"]) + 1
        best_loss = float(train_state["best_loss"])
        history = json.loads(train_state["history"])
        optimizer_state = train_state["optimizer"]
        if rank == 0:
            log.info("resuming from epoch %d (best val_loss %.4f)", start_epoch, best_loss)
    model = prepare_model(model)  # DDP + device placement
    if device.type == "cuda" and config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, config.optim)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    loss_fn = build_loss(config.loss, taxonomy).to(device)
    spec = TransformSpec.from_config(config.data)
    train_collate = Collator(taxonomy, spec, train=config.data.augment, threads=config.train.loader_threads)
    eval_collate = Collator(taxonomy, spec, train=False, threads=config.train.loader_threads)
    batch_size = config.optim.batch_size  # per worker: the global batch scales with the number of workers

    def batches(name: str, collate: Collator, epoch: int):
        shard = ray.train.get_dataset_shard(name)
        kwargs = {"local_shuffle_buffer_size": batch_size * 8, "local_shuffle_seed": config.train.seed + epoch} \
            if name == "train" else {}
        for raw in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2, **kwargs):
            yield collate(raw)

    for epoch in range(start_epoch, config.optim.epochs):
        engine.set_learning_rate(optimizer, engine.learning_rate(config.optim, epoch))
        # a drill crash hits worker 0 mid-epoch (after its second step), as a real failure would
        on_step = (lambda step, epoch=epoch: _maybe_inject_failure(epoch, loop_config.get("fail_once"),
                                                                   loop_config.get("run_uri"))
                   if step == 2 else None) if rank == 0 else None
        metrics = engine.train_one_epoch(model, batches("train", train_collate, epoch), loss_fn, optimizer, device,
                                         taxonomy, amp=config.train.amp, channels_last=config.train.channels_last,
                                         max_steps=config.train.max_steps_per_epoch, on_step=on_step)
        logits, targets = engine.collect_logits(model, batches("val", eval_collate, epoch), device,
                                                amp=config.train.amp, channels_last=config.train.channels_last)
        if world > 1:  # every worker saw a slice of the validation split: gather them for exact macro metrics
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (logits, targets))
            parts = [g for g in gathered if len(g[1])]
            if parts:
                logits = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
                targets = np.concatenate([p[1] for p in parts])
            speeds: list[Any] = [None] * world
            dist.all_gather_object(speeds, metrics["images_per_s"])
            metrics["images_per_s"] = float(sum(speeds))
        metrics.update(engine.evaluate_logits(taxonomy, logits, targets, loss_fn))
        metrics["skipped_records"] = train_collate.skipped + eval_collate.skipped
        metrics["epoch"] = epoch
        metrics["lr"] = engine.learning_rate(config.optim, epoch)
        metrics["start_epoch"] = start_epoch  # > 0 when this attempt resumed from a checkpoint
        val_loss = metrics.get("val_loss", metrics.get("train_loss", math.inf))
        metrics["is_best"] = bool(val_loss < best_loss)
        best_loss = min(best_loss, val_loss)
        metrics["best_val_loss"] = best_loss
        metrics["val_loss"] = val_loss
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
        if rank == 0:
            # stdout, not log: Ray forwards worker stdout to the driver, so `taxonet train` shows progress per epoch.
            # Not print(): Ray Train patches print in its workers to log the line too, and it showed twice.
            sys.stdout.write(f"taxonet train: epoch {epoch + 1}/{config.optim.epochs} "
                             f"{_summary(metrics, taxonomy)}\n")
            sys.stdout.flush()
            with tempfile.TemporaryDirectory(prefix="taxonet-ckpt-") as tmp:
                save_checkpoint(tmp, model, taxonomy, config, spec, metrics=metrics, train_state={
                    "epoch": epoch, "best_loss": best_loss, "optimizer": optimizer.state_dict(),
                    "history": json.dumps(history),
                })
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _summary(metrics: dict[str, Any], taxonomy: Any) -> str:
    parts = [f"loss {metrics.get('train_loss', float('nan')):.4f}", f"val_loss {metrics.get('val_loss', 0):.4f}"]
    parts += [f"{rank} F1 {metrics.get(f'val_{rank}_f1', float('nan')):.3f}" for rank in taxonomy.ranks
              if f"val_{rank}_f1" in metrics]
    parts.append(f"consistency {metrics.get('val_consistency', float('nan')):.3f}")
    parts.append(f"{metrics.get('images_per_s', 0):.0f} img/s")
    return ", ".join(parts)


def fit_and_publish_thresholds(config_dict: dict[str, Any], checkpoint_uri: str, best_uri: str) -> dict[str, Any]:
    """Fit anomaly thresholds on the training split with the best weights; publish the complete checkpoint.

    Runs as a Ray task (on a GPU when training used one). The published directory's manifest is written last, and
    the old one is removed first, so a reader sees either the previous best checkpoint or the new one.
    """
    import torch

    from taxonet import engine
    from taxonet.checkpoint import (add_thresholds, copy_checkpoint, load_checkpoint, materialize, publish_checkpoint,
                                    write_manifest)
    from taxonet.config import from_dict
    from taxonet.data.pipeline import Collator, iter_parquet_batches

    config = from_dict(config_dict)
    device = engine.resolve_device("cuda" if config.train.use_gpu and torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="taxonet-best-") as tmp:
        # Work on a copy: a local Ray checkpoint must keep its optimiser state for a later resume.
        local = Path(tmp) / "ckpt"
        copy_checkpoint(materialize(checkpoint_uri, Path(tmp) / "download"), local)
        best = load_checkpoint(local, device=device)
        collate = Collator(best.taxonomy, best.transform, train=False, threads=config.train.loader_threads)
        raw = iter_parquet_batches(config.data.dataset, config.data.train_split, max(config.optim.batch_size, 64),
                                   shuffle=False)
        thresholds = engine.fit_thresholds(best.model, (collate(b) for b in raw), best.taxonomy, device,
                                           config.anomaly, amp=config.train.amp,
                                           channels_last=config.train.channels_last)
        (local / "train_state.pt").unlink(missing_ok=True)  # serving needs no optimiser state
        write_manifest(local)  # re-list the files without it: add_thresholds verifies the manifest first
        add_thresholds(local, thresholds, {"source_checkpoint": checkpoint_uri})
        publish_checkpoint(local, best_uri)
    return {"thresholds": len(thresholds.rows)}


def _cache_split(mode: str, split_bytes: int) -> bool:
    """Whether to keep a split in the object store: ``mode`` "auto" caches a split whose Parquet bytes (encoded
    images: the blocks hold them as they are) fit in a quarter of the cluster's object store."""
    if mode != "auto":
        return mode == "always"
    import ray

    capacity = float(ray.cluster_resources().get("object_store_memory", 0.0))
    cached = split_bytes <= 0.25 * capacity
    log.info("data.cache=auto: %s a split of %.1f MB (object store %.1f MB)", "caching" if cached else "streaming",
             split_bytes / 1e6, capacity / 1e6)
    return cached


def run_training(config: Any, *, taxonomy: Any | None = None, fail_once: str | None = None) -> TrainingResult:
    """Train ``config`` with Ray Train on the connected Ray cluster (``ray.init`` must have been called).

    A rerun with the same ``train.run_name`` and ``train.storage`` resumes from the latest checkpoint.
    ``fail_once="EPOCH:MARKER_FILE"`` injects one worker crash (fault-tolerance drills and tests).
    """
    import ray
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from taxonet import storage
    from taxonet.data.dataset import DatasetInfo
    from taxonet.data.pipeline import load_split, read_split
    from taxonet.errors import DatasetError

    if not config.data.dataset:
        raise DatasetError("data.dataset is not set: give the prepared dataset URI (--set data.dataset=URI)")
    info = DatasetInfo.load(config.data.dataset)
    taxonomy = taxonomy or info.taxonomy
    # Reading is light (decode happens in the workers' Collator): a fractional CPU per read task lets reads run even
    # when the training workers hold every CPU of a node.
    # one progress bar per split and epoch from Ray Data's coordinators drowns the per-epoch summary lines
    ray.data.DataContext.get_current().enable_progress_bars = bool(os.environ.get("TAXONET_DATA_PROGRESS"))
    datasets = {}
    for name, split in (("train", config.data.train_split), ("val", config.data.val_split)):
        if _cache_split(config.data.cache, sum(s.bytes for s in info.shards_for(split))):
            # read once, here, into the object store; every epoch then iterates over the blocks in memory
            datasets[name] = load_split(config.data.dataset, split)
        else:
            datasets[name] = read_split(config.data.dataset, split, num_cpus=0.25)
    storage_path, filesystem = _storage_for_ray(config.train.storage)
    run_uri = _join(config.train.storage, config.train.run_name)
    resources = {"CPU": config.train.cpus_per_worker}
    if config.train.use_gpu:
        resources["GPU"] = config.train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "taxonomy": taxonomy.to_dict(), "fail_once": fail_once,
                           "run_uri": run_uri},
        scaling_config=ScalingConfig(num_workers=config.train.num_workers, use_gpu=config.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
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
    history = _history(result)
    start_epoch = int((result.metrics or {}).get("start_epoch", 0))
    resumed = start_epoch if start_epoch > 0 else None
    best = min(result.best_checkpoints or [(result.checkpoint, result.metrics)],
               key=lambda pair: pair[1].get("val_loss", math.inf))
    best_checkpoint, best_metrics = best
    best_source = _checkpoint_uri(best_checkpoint, config.train.storage)
    best_uri = _join(run_uri, "best")
    if config.train.use_gpu:  # one pass over the training split: worth a GPU task on the cluster
        remote = ray.remote(fit_and_publish_thresholds).options(num_cpus=config.train.cpus_per_worker, num_gpus=1)
        ray.get(remote.remote(config.to_dict(), best_source, best_uri))
    else:  # on CPU the driver does it itself (no extra scheduling round trip)
        fit_and_publish_thresholds(config.to_dict(), best_source, best_uri)
    storage.write_bytes(_join(run_uri, "history.json"), json.dumps(history, indent=2).encode())
    log.info("training finished in %.0f s; best checkpoint %s", time.time() - started, best_uri)
    return TrainingResult(run_uri=run_uri, best_checkpoint=best_uri, metrics=dict(best_metrics), history=history,
                          resumed_from_epoch=resumed)


def _history(result: Any) -> list[dict[str, Any]]:
    """Per-epoch metrics of the whole run (including epochs before a resume, kept in the checkpoint)."""
    metrics = dict(result.metrics or {})
    try:
        checkpoint = result.checkpoint
        with checkpoint.as_directory() as directory:
            import torch

            state = torch.load(Path(directory) / "train_state.pt", map_location="cpu", weights_only=True)
            return json.loads(state["history"])
    except Exception:  # no checkpoint: fall back to the last report only
        return [metrics] if metrics else []


def _checkpoint_uri(checkpoint: Any, storage_uri: str) -> str:
    """A Ray Train Checkpoint → a URI taxonet's storage understands (s3://bucket/key or a local path)."""
    from taxonet import storage

    if storage.is_s3(storage_uri):
        path = checkpoint.path
        return path if path.startswith("s3://") else f"s3://{path}"
    return checkpoint.path
