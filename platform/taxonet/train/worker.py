"""The Ray Train worker: :func:`taxonet.train.loop.fit` on one worker of a TorchTrainer (DDP).

Thin by design, the Ray lines marked ``# Ray``: the run config and taxonomy arrive in Ray's ``train_loop_config``,
the data as this worker's Ray Data shards of raw rows (decoded here by the pipeline's
:class:`~taxonet.data.pipeline.Collator`), a resume as Ray Train's latest checkpoint (verified and checked against
the run by :func:`~taxonet.train.loop.resume_state`); the model is placed by
``prepare_model`` (DDP), and every epoch is reported to Ray Train, worker 0 with its checkpoint.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint
from ray.train.torch import get_device, prepare_model

from taxonet import storage
from taxonet.config import RunConfig
from taxonet.data.device_decode import DeviceCollator, background
from taxonet.data.pipeline import Collator, resolve_loader_threads
from taxonet.data.transforms import TransformSpec
from taxonet.taxonomy import Taxonomy
from taxonet.train.loop import Batch, EpochCheckpoint, Metrics, epoch_summary, fit, resume_state

log = logging.getLogger(__name__)


class ShardData:
    """This worker's shards of the train and val splits, decoded per batch (the loop's :class:`EpochData`).

    ``data.decode`` picks the decoder: the CPU :class:`Collator` (PIL, ``train.loader_threads`` threads; "auto" = the
    CPUs Ray gave this worker) or the :class:`DeviceCollator` (one nvjpeg call per batch, resize and augmentation on
    ``device``). On a CUDA device, reading and decoding run one thread ahead of the training step (``background``);
    on a CPU they stay in the training thread, so CPU runs keep their seeded results.
    """

    def __init__(self, config: RunConfig, taxonomy: Taxonomy, device: torch.device, rank: int = 0) -> None:
        spec = TransformSpec.from_config(config.data)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", config.train.cpus_per_worker)  # Ray
        threads = resolve_loader_threads(config.train.loader_threads, cpus)
        self.device = device
        if decode_on_device(config.data.decode, device):
            seed = config.train.seed * 1000 + rank
            self.train_collate: Collator = DeviceCollator(taxonomy, spec, train=config.data.augment, device=device,
                                                          seed=seed)
            self.eval_collate: Collator = DeviceCollator(taxonomy, spec, train=False, device=device, seed=seed)
        else:
            self.train_collate = Collator(taxonomy, spec, train=config.data.augment, threads=threads)
            self.eval_collate = Collator(taxonomy, spec, train=False, threads=threads)
        # per worker: the global batch scales with the number of workers
        self.batch_size = config.optim.batch_size
        self.seed = config.train.seed

    def train(self, epoch: int) -> Iterator[Batch]:
        return self._batches("train", self.train_collate, local_shuffle_buffer_size=self.batch_size * 8,
                             local_shuffle_seed=self.seed + epoch)

    def val(self, epoch: int) -> Iterator[Batch]:
        return self._batches("val", self.eval_collate)

    def skipped_records(self) -> int:
        return self.train_collate.skipped + self.eval_collate.skipped

    def _batches(self, name: str, collate: Collator, **shuffle: int) -> Iterator[Batch]:
        batches = self._decoded(name, collate, **shuffle)
        return background(batches, self.device) if self.device.type == "cuda" else batches

    def _decoded(self, name: str, collate: Collator, **shuffle: int) -> Iterator[Batch]:
        shard = ray.train.get_dataset_shard(name)  # Ray
        for raw in shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", prefetch_batches=2,
                                      **shuffle):
            yield collate(raw)


def decode_on_device(mode: str, device: torch.device) -> bool:
    """``data.decode``: "gpu" always uses the device path (on a CPU device too: the same code, as the tests run it),
    "auto" when the worker has a CUDA device, "cpu" never."""
    return mode == "gpu" or (mode == "auto" and device.type == "cuda")


class ReportToRayTrain:
    """Every epoch's metrics to Ray Train; worker 0 adds the epoch's checkpoint and prints a progress line."""

    def __init__(self, rank: int, taxonomy: Taxonomy, epochs: int) -> None:
        self.rank, self.taxonomy, self.epochs = rank, taxonomy, epochs

    def __call__(self, metrics: Metrics, checkpoint: EpochCheckpoint) -> None:
        if self.rank != 0:
            ray.train.report(metrics)  # Ray
            return
        # stdout, not log: Ray forwards worker stdout to the driver, so `taxonet train` shows progress per epoch.
        # Not print(): Ray Train patches print in its workers to log the line too, and it showed twice.
        sys.stdout.write(f"taxonet train: epoch {metrics['epoch'] + 1}/{self.epochs} "
                         f"{epoch_summary(metrics, self.taxonomy)}\n")
        sys.stdout.flush()
        with tempfile.TemporaryDirectory(prefix="taxonet-ckpt-") as tmp:
            checkpoint.write(tmp)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))  # Ray


def checkpoint_uri(checkpoint: Checkpoint, storage_uri: str) -> str:
    """A Ray Train Checkpoint of a run stored under ``storage_uri`` → a URI taxonet's storage reads (s3://bucket/key
    or a local path)."""
    if storage.is_s3(storage_uri):
        path = checkpoint.path
        return path if path.startswith("s3://") else f"s3://{path}"
    return checkpoint.path


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``loop_config`` holds the run config and the taxonomy."""
    config: RunConfig = loop_config["config"]
    taxonomy: Taxonomy = loop_config["taxonomy"]
    rank = ray.train.get_context().get_world_rank()  # Ray
    resume = None
    checkpoint = ray.train.get_checkpoint()  # Ray: a rerun with the same name, or a retry after a worker failure
    if checkpoint:
        # verified (manifest, every hash) and refused if its taxonomy or architecture is not this run's; read into
        # memory through taxonet.storage, so no download directory is left behind
        resume = resume_state(checkpoint_uri(checkpoint, config.train.storage), config, taxonomy)
        if rank == 0:
            log.info("resuming from epoch %d (best val_loss %.4f)", resume.epoch + 1, resume.best_loss)
    device = get_device()  # Ray
    fit(config, taxonomy, ShardData(config, taxonomy, device, rank),
        ReportToRayTrain(rank, taxonomy, config.optim.epochs), device=device, resume=resume, seed_offset=rank,
        prepare_model=prepare_model)  # Ray: DDP placement
