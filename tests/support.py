"""Helpers for tests and benchmarks that train on in-memory tensors with the product's loop (no Ray).

``from tests.support import quick_checkpoint`` from tests; scripts under tests/bench put the repository root on
``sys.path`` first. Training always goes through :func:`taxonet.train.loop.fit` and
:func:`taxonet.train.loop.complete_checkpoint`, as the Ray Train worker and driver do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from taxonet.config import RunConfig, load_config
from taxonet.data.synthetic import SyntheticInsects, SyntheticSample
from taxonet.data.transforms import TransformSpec, build_eval_transform
from taxonet.devices import resolve_device
from taxonet.taxonomy import Taxonomy
from taxonet.train.loop import BEST, Batch, EpochCheckpoint, Metrics, complete_checkpoint, epoch_summary, fit

log = logging.getLogger(__name__)


def tensor_batches(images: torch.Tensor, targets: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                   seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
    """Mini-batches over in-memory tensors (seeded shuffle per epoch)."""
    order = torch.arange(len(images))
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        yield images[index], targets[index]


def samples_to_tensors(samples: Iterable[SyntheticSample], taxonomy: Taxonomy,
                       transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic samples (``.image``, ``.labels``) → (images, targets) tensors."""
    images, targets = [], []
    for sample in samples:
        images.append(transform(sample.image))
        targets.append(taxonomy.encode(sample.labels))
    return torch.stack(images), torch.tensor(targets, dtype=torch.int64)


@dataclass
class TensorData:
    """The loop's EpochData over in-memory tensors: the training set shuffled per epoch (seeded), the validation
    set in order; :meth:`unshuffled_train` is what the anomaly thresholds are fitted on."""

    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor
    batch_size: int = 32
    val_batch_size: int = 128
    seed: int = 0

    def train(self, epoch: int) -> Iterator[Batch]:
        return tensor_batches(self.train_images, self.train_targets, self.batch_size, shuffle=True, seed=self.seed,
                              epoch=epoch)

    def val(self, epoch: int) -> Iterator[Batch]:
        return tensor_batches(self.val_images, self.val_targets, self.val_batch_size)

    def skipped_records(self) -> int:
        return 0

    def unshuffled_train(self) -> Iterator[Batch]:
        return tensor_batches(self.train_images, self.train_targets, self.batch_size)


@dataclass
class KeepBest:
    """The loop's reporter for local runs: writes the best epoch so far into ``directory`` and logs every epoch."""

    directory: Path
    taxonomy: Taxonomy

    def __call__(self, metrics: Metrics, checkpoint: EpochCheckpoint) -> None:
        log.info("epoch %d: %s", metrics["epoch"], epoch_summary(metrics, self.taxonomy))
        if metrics[BEST]:
            checkpoint.write(self.directory)


def train_locally(config: RunConfig, taxonomy: Taxonomy, data: TensorData, out_dir: str | Path, *,
                  device: str | torch.device = "cpu") -> tuple[Path, list[Metrics]]:
    """A whole run in this process, as the Ray Train driver does it: the loop, then the best epoch completed with
    thresholds into ``out_dir/best``. Returns (that directory, the history)."""
    device = resolve_device(device)
    out_dir = Path(out_dir)
    history = fit(config, taxonomy, data, KeepBest(out_dir / "best-epoch", taxonomy), device=device)
    complete_checkpoint(out_dir / "best-epoch", out_dir / "best", data.unshuffled_train(), device=device,
                        history=history)
    return out_dir / "best", history


def quick_checkpoint(directory: str | Path, *, taxonomy: Taxonomy | None = None, image_size: int = 32,
                     epochs: int = 2, seed: int = 0, per_species: int = 24, backbone: str = "tiny_cnn",
                     device: str | torch.device = "cpu") -> Path:
    """Train a tiny model on synthetic images for a few epochs and write a complete checkpoint (with thresholds).

    For tests and demos that need a real checkpoint quickly (about 10 s on 2 CPU cores). Returns its directory.
    """
    taxonomy = taxonomy or Taxonomy.demo()
    config = load_config("demo", {
        "name": "quick", "model.backbone": backbone, "data.input_size": image_size, "optim.epochs": epochs,
        "optim.batch_size": 32, "train.seed": seed, "train.run_name": "quick",
        # the demo config's earlier recipe, pinned: the quick models of the tests do not follow the demo's
        "optim.lr": 3e-3, "loss.outlier_weight": 0.0, "loss.dependency": "paper",
    })
    transform = build_eval_transform(TransformSpec.from_config(config.data))
    generator = SyntheticInsects(taxonomy, image_size=image_size, seed=seed)
    train = samples_to_tensors(generator.samples(per_species), taxonomy, transform)
    val = samples_to_tensors(generator.samples(max(4, per_species // 4), start_index=10_000), taxonomy, transform)
    data = TensorData(*train, *val, batch_size=32, val_batch_size=64, seed=seed)
    return train_locally(config, taxonomy, data, directory, device=device)[0]
