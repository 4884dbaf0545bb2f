"""The training loop: train steps over one epoch, evaluation, best-epoch selection, checkpoints, anomaly thresholds.

Plain PyTorch, no Ray: everything that trains a taxonet model runs :func:`fit`, whose epochs run
:func:`train_one_epoch` — the Ray Train worker (:mod:`taxonet.train.worker` adds dataset shards, DDP and Ray's
report), the tests and the benchmarks (``tests/bench/bench_train.py`` through :func:`fit`, the GPU benchmark
``tests/bench/gpu_train.py`` through :func:`train_one_epoch` on its own data paths). Batches are
``(images [N,3,S,S] float32, targets [N, depth] int64)`` pairs, ``-1`` marking an unspecified rank.

What differs between callers comes in through two small objects: the :class:`EpochData` (which batches an epoch
trains and validates on) and the :class:`EpochReporter` (what becomes of an epoch's metrics and checkpoint: Ray
Train's report in the worker, a local directory in the tests). Under ``torch.distributed`` (DDP) the validation
outputs of every rank are gathered, so every rank computes the same exact macro metrics and picks the same best
epoch. After training, :func:`complete_checkpoint` turns the best epoch's checkpoint into the one serving loads.

History: every epoch's metrics (numbers only) in one list, each entry with ``epoch``, ``is_best`` and
``start_epoch``; it travels in ``train_state.pt`` for resuming and in the completed checkpoint's
``metrics.json["history"]`` for reports.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from taxonet import storage
from taxonet.anomaly import AnomalyThresholds
from taxonet.checkpoint import load_checkpoint, read_verified, require_compatible, save_checkpoint
from taxonet.config import AnomalyConfig, ModelConfig, OptimConfig, RunConfig
from taxonet.data.transforms import TransformSpec
from taxonet.devices import autocast, to_device
from taxonet.errors import CheckpointError
from taxonet.losses import build_loss
from taxonet.metrics import consistency_rate, evaluate_predictions
from taxonet.models import WeightsUnavailableError, build_model, imagenet_weights
from taxonet.taxonomy import Taxonomy

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Metrics = dict[str, Any]

#: the history key that marks the epoch with the lowest validation loss so far (the paper's selection rule)
BEST = "is_best"
#: files of an epoch checkpoint that hold its weights and what resuming needs (written by save_checkpoint)
MODEL_FILE, TRAIN_STATE_FILE = "model.pt", "train_state.pt"


# ---------------------------------------------------------------------------------------------------- set-up
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pretrained_weights(model: ModelConfig) -> dict[str, torch.Tensor] | BinaryIO | None:
    """The backbone's starting weights that ``model.weights`` names: null (random init), "imagenet" (torchvision's
    weights API) or a state-dict file, a local path or an s3:// URI (e.g. a torchvision ``.pth`` file copied into a
    cluster that has no internet access)."""
    if model.weights in (None, "", "none", "random"):
        return None
    if model.weights == "imagenet":
        return imagenet_weights(model.backbone)
    try:
        return io.BytesIO(storage.read_bytes(model.weights))
    except FileNotFoundError as exc:
        raise WeightsUnavailableError(f"weights file {model.weights!r} not found") from exc


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The paper's optimiser: Adam, lr 1e-4, no weight decay (SGD was 1–2% worse; offered for comparison)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def learning_rate(optim: OptimConfig, epoch: int) -> float:
    """The learning rate of ``epoch``: a pure function of the epoch, so a resumed run continues the same schedule."""
    epochs, peak = optim.epochs, optim.lr
    if optim.schedule == "cosine" and epochs > 1:
        return peak * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if optim.schedule == "onecycle" and epochs > 1:
        # Warm-up keeps BatchNorm statistics and Adam's moments from blowing up in the first epochs at a high peak
        # learning rate (validation-loss spikes of 10x otherwise); the decay then settles the weights.
        warm = max(1, round(0.3 * epochs))
        if epoch < warm:
            return peak * (0.04 + 0.96 * epoch / warm)
        return peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / (epochs - warm)))
    return peak


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


# ---------------------------------------------------------------------------------------------------- one epoch
def predictions(argmax: dict[str, torch.Tensor], taxonomy: Taxonomy) -> np.ndarray:
    """The predicted class per rank as int [N, depth] from each head's argmax; ranks without a head (single-task)
    are filled in from the taxonomy chain."""
    ranks = [r for r in taxonomy.ranks if r in argmax]
    out = np.full((argmax[ranks[0]].shape[0], taxonomy.depth), -1, dtype=np.int64)
    for rank in ranks:
        out[:, taxonomy.level(rank)] = argmax[rank].cpu().numpy()
    deepest = max(taxonomy.level(r) for r in ranks)
    for level in range(deepest - 1, -1, -1):
        if taxonomy.ranks[level] not in argmax:
            out[:, level] = taxonomy.parent_table(level + 1)[out[:, level + 1]]
    return out


@dataclass
class _Accumulator:
    """Loss parts, argmax per rank and targets of every step, kept on the device until the epoch ends: reading a
    value back per step would make the host wait for the GPU at every step."""

    images: int = 0
    parts: list[tuple[dict[str, torch.Tensor], int]] = field(default_factory=list)
    argmax: list[dict[str, torch.Tensor]] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)

    def add(self, parts: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], targets: torch.Tensor) -> None:
        batch_size = targets.shape[0]
        self.images += batch_size
        self.parts.append(({key: value.detach() for key, value in parts.items()}, batch_size))
        self.argmax.append({rank: values.detach().argmax(dim=1) for rank, values in logits.items()})
        self.targets.append(targets)

    def means(self) -> dict[str, float]:
        """Batch-size weighted means of the loss parts (summed step by step, in step order)."""
        sums: dict[str, float] = {}
        for parts, batch_size in self.parts:
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value) * batch_size
        return {key: total / max(self.images, 1) for key, total in sums.items()}

    def predictions_and_targets(self, taxonomy: Taxonomy) -> tuple[np.ndarray, np.ndarray]:
        argmax = {rank: torch.cat([step[rank] for step in self.argmax]) for rank in self.argmax[0]}
        return predictions(argmax, taxonomy), torch.cat(self.targets).cpu().numpy()


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, taxonomy: Taxonomy, *, amp: bool = True, channels_last: bool = True,
                    max_steps: int = 0) -> Metrics:
    """One pass of train steps over ``batches`` (at most ``max_steps`` when > 0); returns the mean loss parts,
    per-rank training F1 and consistency, images/s and the wait for the first batch."""
    model.train()
    acc = _Accumulator()
    start = time.perf_counter()
    first_batch_at = None
    steps = 0
    for images, targets in batches:
        if first_batch_at is None:
            first_batch_at = time.perf_counter()
        if images.shape[0] == 0:
            continue
        images = to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = {k: v.float() for k, v in logits.items()}
        parts = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        acc.add(parts, logits, targets)
        steps += 1
        if max_steps and steps >= max_steps:
            break
    means = acc.means()  # reads the loss parts back: waits for the device, so the time below is the work's
    elapsed = time.perf_counter() - start
    result: Metrics = {f"train_{k}": v for k, v in means.items()}
    # time to first batch: the data pipeline's start-up (Ray Data plans and launches its read tasks each epoch)
    first_batch_s = (first_batch_at - start) if first_batch_at is not None else elapsed
    result.update({"train_images": acc.images, "train_seconds": elapsed,
                   "images_per_s": acc.images / max(elapsed, 1e-9), "train_steps": steps,
                   "first_batch_s": first_batch_s})
    if acc.images:
        predicted, targets_all = acc.predictions_and_targets(taxonomy)
        for rank, values in evaluate_predictions(taxonomy, targets_all, predicted).items():
            result[f"train_{rank}_f1"] = values["f1"]
        result["train_consistency"] = consistency_rate(taxonomy, predicted)
    return result


@torch.no_grad()
def collect_logits(model: nn.Module, batches: Iterable[Batch], device: torch.device, *, amp: bool = True,
                   channels_last: bool = True, max_steps: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run the model in eval mode; returns ({rank: logits float32 [N, C]}, targets int [N, depth])."""
    model.eval()
    logits_by_rank: dict[str, list[np.ndarray]] = {}
    targets_all: list[np.ndarray] = []
    for step, (images, targets) in enumerate(batches, start=1):
        if images.shape[0] == 0:
            continue
        with autocast(device, amp):
            logits = model(to_device(images, device, channels_last))
        for rank, values in logits.items():
            logits_by_rank.setdefault(rank, []).append(values.float().cpu().numpy())
        targets_all.append(targets.cpu().numpy())
        if max_steps and step >= max_steps:
            break
    if not targets_all:
        return {}, np.zeros((0, 0), dtype=np.int64)
    return {k: np.concatenate(v) for k, v in logits_by_rank.items()}, np.concatenate(targets_all)


def evaluate_logits(taxonomy: Taxonomy, logits: dict[str, np.ndarray], targets: np.ndarray,
                    loss_fn: nn.Module | None = None, prefix: str = "val_") -> Metrics:
    """Loss parts (batch-size independent means), per-rank macro P/R/F1/accuracy and consistency."""
    result: Metrics = {f"{prefix}images": int(len(targets))}
    if len(targets) == 0:
        return result
    tensors = {k: torch.from_numpy(v) for k, v in logits.items()}
    if loss_fn is not None:
        with torch.no_grad():
            parts = loss_fn(tensors, torch.from_numpy(targets))
        result.update({f"{prefix}{k}": float(v) for k, v in parts.items()})
    predicted = predictions({rank: values.argmax(dim=1) for rank, values in tensors.items()}, taxonomy)
    for rank, values in evaluate_predictions(taxonomy, targets, predicted).items():
        for metric in ("precision", "recall", "f1", "accuracy"):
            result[f"{prefix}{rank}_{metric}"] = values[metric]
    result[f"{prefix}consistency"] = consistency_rate(taxonomy, predicted)
    return result


def fit_thresholds(model: nn.Module, batches: Iterable[Batch], taxonomy: Taxonomy, device: torch.device,
                   anomaly: AnomalyConfig, *, amp: bool = True, channels_last: bool = True) -> AnomalyThresholds:
    """Fit the per-(rank, class) N(μ, σ) thresholds on the given (training) batches with the model in eval mode."""
    logits, targets = collect_logits(model, batches, device, amp=amp, channels_last=channels_last)
    return AnomalyThresholds.fit(taxonomy, logits, targets, k=anomaly.k, min_samples=anomaly.min_samples,
                                 chain_rule=anomaly.chain_rule, round_tau=anomaly.round_tau)


def _gather_ranks(logits: dict[str, np.ndarray], targets: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Under DDP every rank saw a slice of the validation split: all slices, for exact macro metrics."""
    world = dist.get_world_size()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (logits, targets))
    parts = [g for g in gathered if len(g[1])]
    if not parts:
        return logits, targets
    return ({k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]},
            np.concatenate([p[1] for p in parts]))


def _sum_over_ranks(value: float) -> float:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return float(sum(values))


# ---------------------------------------------------------------------------------------------------- epochs
class EpochData(Protocol):
    """The batches of a run: ``train(epoch)`` and ``val(epoch)`` return fresh iterables (this rank's share under
    DDP); ``skipped_records()`` counts the records the decoding skipped so far (0 for in-memory tensors)."""

    def train(self, epoch: int) -> Iterable[Batch]: ...

    def val(self, epoch: int) -> Iterable[Batch]: ...

    def skipped_records(self) -> int: ...


class EpochReporter(Protocol):
    """Called by every rank after every epoch with its metrics (the same on every rank) and a writer of its
    checkpoint; it decides where (if anywhere) the checkpoint goes and to whom the metrics are reported."""

    def __call__(self, metrics: Metrics, checkpoint: EpochCheckpoint) -> None: ...


@dataclass
class TrainState:
    """Where a run stands after an epoch: the weights and what continuing it needs (read for a resume)."""

    #: the last finished epoch
    epoch: int
    best_loss: float
    history: list[Metrics]
    optimizer: dict[str, Any]
    model: dict[str, torch.Tensor]

    @classmethod
    def load(cls, uri: str | Path) -> TrainState:
        """From an epoch checkpoint (local directory or URI; one that :meth:`EpochCheckpoint.write` wrote), verified
        first: its manifest must exist (a half-written checkpoint has none) and every listed file must match its
        sha256 (:func:`taxonet.checkpoint.read_verified`). Read into memory: nothing is left on disk, also from S3."""
        _, files = read_verified(uri, (TRAIN_STATE_FILE, MODEL_FILE))
        try:
            state = torch.load(io.BytesIO(files[TRAIN_STATE_FILE]), map_location="cpu", weights_only=True)
            weights = torch.load(io.BytesIO(files[MODEL_FILE]), map_location="cpu", weights_only=True)
            return cls(epoch=int(state["epoch"]), best_loss=float(state["best_loss"]),
                       history=json.loads(state["history"]), optimizer=state["optimizer"], model=weights)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot resume from {uri}: {TRAIN_STATE_FILE} is not a taxonet training state "
                                  f"({type(exc).__name__}: {exc})") from None


def resume_state(uri: str | Path, config: RunConfig, taxonomy: Taxonomy) -> TrainState:
    """The state to resume ``config`` on ``taxonomy`` from the epoch checkpoint at ``uri``: verified
    (:meth:`TrainState.load`) and refused with every difference named when its taxonomy or model architecture is not
    the run's (:func:`taxonet.checkpoint.require_compatible`)."""
    state = TrainState.load(uri)
    require_compatible(uri, config, taxonomy, action="resume from")
    return state


def check_resumable(uri: str | Path, config: RunConfig, taxonomy: Taxonomy) -> None:
    """:func:`resume_state`'s checks without loading the weights: what the driver checks before any worker starts."""
    read_verified(uri, ())
    require_compatible(uri, config, taxonomy, action="resume from")


@dataclass
class EpochCheckpoint:
    """The checkpoint of one finished epoch, written only when a reporter asks for it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    taxonomy: Taxonomy
    config: RunConfig
    metrics: Metrics
    best_loss: float
    history: list[Metrics]

    def write(self, directory: str | Path) -> Path:
        """A complete checkpoint (weights, taxonomy, config, eval transform, metrics) plus the resume state."""
        return save_checkpoint(directory, self.model, self.taxonomy, self.config,
                               TransformSpec.from_config(self.config.data), metrics=self.metrics, train_state={
                                   "epoch": self.metrics["epoch"], "best_loss": self.best_loss,
                                   "optimizer": self.optimizer.state_dict(),
                                   # a JSON string: weights_only loading accepts it whatever the metrics hold
                                   "history": json.dumps(self.history)})


def build_training(config: RunConfig, taxonomy: Taxonomy, device: torch.device, *, resume: TrainState | None = None,
                   prepare_model: Callable[[nn.Module], nn.Module] | None = None
                   ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(model, loss, optimiser) as :func:`fit` trains them: the model on ``device`` (placed by ``prepare_model``
    when given, e.g. DDP's wrapper), channels_last on CUDA when configured, weights and optimiser state from
    ``resume``."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # a resumed run gets its weights from the resume state: no pretrained download then
    model = build_model(config.model, taxonomy, pretrained_weights(config.model) if resume is None else None)
    if resume is not None:
        model.load_state_dict(resume.model)
    model = prepare_model(model) if prepare_model else model.to(device)
    if device.type == "cuda" and config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(config.loss, taxonomy).to(device)
    optimizer = build_optimizer(model, config.optim)
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
    return model, loss_fn, optimizer


def fit(config: RunConfig, taxonomy: Taxonomy, data: EpochData, reporter: EpochReporter, *, device: torch.device,
        resume: TrainState | None = None, seed_offset: int = 0,
        prepare_model: Callable[[nn.Module], nn.Module] | None = None) -> list[Metrics]:
    """Train as the paper did: ``config.optim.epochs`` epochs (after ``resume.epoch`` when resuming), each
    evaluated on the validation batches; the epoch with the lowest validation loss so far is marked ``is_best``.
    Every epoch goes to ``reporter`` with a writer of its checkpoint. Returns the history of the whole run.

    ``seed_offset`` (the DDP rank) varies the seed per worker; ``prepare_model`` places the model (DDP's wrapper).
    """
    set_seed(config.train.seed + seed_offset)
    model, loss_fn, optimizer = build_training(config, taxonomy, device, resume=resume, prepare_model=prepare_model)
    start_epoch = resume.epoch + 1 if resume else 0
    best_loss = resume.best_loss if resume else math.inf
    history = list(resume.history) if resume else []
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    amp, channels_last = config.train.amp, config.train.channels_last
    for epoch in range(start_epoch, config.optim.epochs):
        rate = learning_rate(config.optim, epoch)
        set_learning_rate(optimizer, rate)
        metrics = train_one_epoch(model, data.train(epoch), loss_fn, optimizer, device, taxonomy, amp=amp,
                                  channels_last=channels_last, max_steps=config.train.max_steps_per_epoch)
        logits, targets = collect_logits(model, data.val(epoch), device, amp=amp, channels_last=channels_last)
        if distributed:
            logits, targets = _gather_ranks(logits, targets)
            metrics["images_per_s"] = _sum_over_ranks(metrics["images_per_s"])
        metrics.update(evaluate_logits(taxonomy, logits, targets, loss_fn))
        val_loss = metrics.get("val_loss", metrics.get("train_loss", math.inf))
        metrics.update({"val_loss": val_loss, "epoch": epoch, "lr": rate, "start_epoch": start_epoch,
                        "skipped_records": data.skipped_records(), BEST: bool(val_loss < best_loss)})
        best_loss = min(best_loss, val_loss)
        metrics["best_val_loss"] = best_loss
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
        reporter(metrics, EpochCheckpoint(model, optimizer, taxonomy, config, metrics, best_loss, list(history)))
    return history


def complete_checkpoint(source: str | Path, target: str | Path, batches: Iterable[Batch], *, device: torch.device,
                        history: list[Metrics]) -> AnomalyThresholds:
    """The end of every training run: the best epoch's checkpoint (``source``, left as it is) becomes the one serving
    loads (``target``): the anomaly thresholds fitted on ``batches`` (the training split, eval transform) with its
    weights in eval mode, the run's history in its metrics, no resume state. Same name and version as ``source``."""
    best = load_checkpoint(source, device=device)
    config = best.config
    thresholds = fit_thresholds(best.model, batches, best.taxonomy, device, config.anomaly, amp=config.train.amp,
                                channels_last=config.train.channels_last)
    save_checkpoint(target, best.model, best.taxonomy, config, best.transform, thresholds=thresholds,
                    metrics={**best.metrics, "history": history}, name=best.name, version=best.version)
    return thresholds


def epoch_summary(metrics: Metrics, taxonomy: Taxonomy) -> str:
    """One line per epoch for people: losses, validation F1 per rank, consistency, speed."""
    parts = [f"loss {metrics.get('train_loss', math.nan):.4f}", f"val_loss {metrics.get('val_loss', 0):.4f}"]
    parts += [f"{rank} F1 {metrics[f'val_{rank}_f1']:.3f}" for rank in taxonomy.ranks if f"val_{rank}_f1" in metrics]
    parts.append(f"consistency {metrics.get('val_consistency', math.nan):.3f}")
    parts.append(f"{metrics.get('images_per_s', 0):.0f} img/s")
    return ", ".join(parts)
