"""The device decode path (``data.decode: gpu``) run on the CPU: the same code a GPU worker runs, with
``device="cpu"``. It must give the CPU path's tensors (shape, dtype, range; equal values for eval crops stored at the
input size), augment per image, skip bad records the same way, and overlap batches in a thread."""

from __future__ import annotations

import math
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from taxonet.data.device_decode import DeviceCollator, background, jpeg_size, sampling_matrices
from taxonet.data.pipeline import Collator, iter_parquet_batches
from taxonet.data.prepare import PrepareOptions, prepare_dataset
from taxonet.data.transforms import TransformSpec
from taxonet.taxonomy import UNSPECIFIED, Taxonomy
from taxonet.train.worker import decode_on_device

pytestmark = pytest.mark.data

CPU = torch.device("cpu")


def _dataset(folder: Path, dst: Path, taxonomy: Taxonomy, train_size: int = 0) -> str:
    prepare_dataset(str(folder), str(dst), taxonomy=taxonomy,
                    options=PrepareOptions(train_size=train_size, max_side=64, shard_size=50, val_fraction=0.25,
                                           test_fraction=0.0, workers=0, progress=False))
    return str(dst)


def _unnormalised(images: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    return images * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)


def test_eval_crops_stored_at_the_input_size_decode_exactly_as_on_the_cpu_path(
        image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> None:
    spec = TransformSpec(input_size=24)
    dataset = _dataset(image_folder, tmp_path / "ds", demo_taxonomy, train_size=24)
    batch = next(iter_parquet_batches(dataset, "train", 16, shuffle=False))
    expected, expected_targets = Collator(demo_taxonomy, spec, train=False)(batch)
    images, targets = DeviceCollator(demo_taxonomy, spec, train=False, device=CPU)(batch)
    assert images.shape == expected.shape == (16, 3, 24, 24) and images.dtype == torch.float32
    assert torch.equal(targets, expected_targets) and targets.dtype == torch.long
    assert torch.allclose(images, expected, atol=1e-5)  # libjpeg both ways, no resize: the same pixels


def test_eval_resized_on_the_device_is_close_to_the_cpu_path(image_folder: Path, tmp_path: Path,
                                                             demo_taxonomy: Taxonomy) -> None:
    spec = TransformSpec(input_size=24)
    batch = next(iter_parquet_batches(_dataset(image_folder, tmp_path / "ds", demo_taxonomy), "train", 16,
                                      shuffle=False))
    expected, _ = Collator(demo_taxonomy, spec, train=False)(batch)  # 32 px crops: PIL's bilinear resize
    images, _ = DeviceCollator(demo_taxonomy, spec, train=False, device=CPU)(batch)  # torch's antialiased bilinear
    difference = (_unnormalised(images, spec) - _unnormalised(expected, spec)).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.25


def test_train_batches_are_augmented_per_image_in_the_cpu_paths_range(image_folder: Path, tmp_path: Path,
                                                                     demo_taxonomy: Taxonomy) -> None:
    spec = TransformSpec(input_size=24)
    batch = next(iter_parquet_batches(_dataset(image_folder, tmp_path / "ds", demo_taxonomy, 24), "train", 16,
                                      shuffle=False))
    same = {key: [values[0]] * 16 for key, values in batch.items()}  # one image 16 times
    collator = DeviceCollator(demo_taxonomy, spec, train=True, device=CPU, seed=3)
    first, targets = collator(same)
    second, _ = collator(same)
    assert first.shape == (16, 3, 24, 24) and first.dtype == torch.float32 and targets.shape == (16, 3)
    pixels = _unnormalised(first, spec)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # the normalised range of [0, 1] pixels
    distinct = {tuple(image.flatten()[:64].tolist()) for image in first}
    assert len(distinct) == 16  # each copy got its own random parameters
    assert not torch.equal(first, second)  # and new ones every batch
    again, _ = DeviceCollator(demo_taxonomy, spec, train=True, device=CPU, seed=3)(same)
    assert torch.equal(first, again)  # seeded
    cpu_path, _ = Collator(demo_taxonomy, spec, train=True)(batch)
    assert abs(_unnormalised(cpu_path, spec).mean() - _unnormalised(
        DeviceCollator(demo_taxonomy, spec, train=True, device=CPU)(batch)[0], spec).mean()) < 0.15


def test_sampling_matrices_cover_the_papers_augmentations() -> None:
    matrices = sampling_matrices(4000, torch.Generator().manual_seed(0))
    affine_part = matrices[:, :2, :2]
    # without perspective the map is rotation/scale (±40°, 0.85–1.15) times flips: |det| = 1 / scale²
    plain = (matrices[:, 2, :2].abs().sum(dim=1) < 1e-9)
    determinants = torch.linalg.det(affine_part[plain]).abs()
    assert 0.4 < plain.double().mean() < 0.6  # perspective with p = 0.5
    assert determinants.min() >= 1 / 1.15 ** 2 - 1e-6 and determinants.max() <= 1 / 0.85 ** 2 + 1e-6
    flips = torch.sign(torch.linalg.det(affine_part[plain]))
    assert 0.3 < (flips < 0).double().mean() < 0.7  # one flip of two (h xor v) mirrors the image
    angles = torch.atan2(affine_part[plain][:, 0, 1], affine_part[plain][:, 0, 0]).abs() * 180 / math.pi
    assert angles.max() > 35  # rotations reach ±40° (up to flips)


def test_bad_records_are_skipped_and_counted_as_on_the_cpu_path(demo_taxonomy: Taxonomy,
                                                                 image_bytes: Callable[..., bytes]) -> None:
    spec = TransformSpec(input_size=24)
    good = image_bytes(size=(30, 20))
    png = image_bytes(size=(30, 20), fmt="PNG")
    batch = {
        "image": [good, b"", good[: len(good) // 3], b"GIF89a-not-really", good, None, png],
        "order": ["Diptera", "Diptera", "Diptera", "Diptera", "Hymenoptera", "Diptera", "Diptera"],
        "family": ["Syrphidae", None, None, None, None, None, None],
        "species": ["Eristalis tenax", None, None, None, None, None, None],
    }
    collator = DeviceCollator(demo_taxonomy, spec, train=False, device=CPU)
    images, targets = collator(batch)
    expected, expected_targets = Collator(demo_taxonomy, spec, train=False)(batch)
    assert images.shape == expected.shape == (3, 3, 24, 24)  # two JPEGs and the PNG (decoded by PIL)
    assert torch.equal(targets, expected_targets)
    assert targets[1].tolist() == [demo_taxonomy.index("order", "Hymenoptera"), UNSPECIFIED, UNSPECIFIED]
    assert collator.skipped == 4 and collator.skipped_by_reason == {"corrupt": 4}
    images, targets = collator({"image": [b"junk"], "order": ["Diptera"], "family": [None], "species": [None]})
    assert images.shape == (0, 3, 24, 24) and targets.shape == (0, 3)


def test_a_decompression_bomb_is_refused_from_its_header(demo_taxonomy: Taxonomy,
                                                         image_bytes: Callable[..., bytes]) -> None:
    big = image_bytes(size=(400, 300))
    assert jpeg_size(big) == (400, 300) and jpeg_size(b"\x89PNG....") is None
    collator = DeviceCollator(demo_taxonomy, TransformSpec(input_size=24), train=False, device=CPU,
                              max_pixels=100_000)
    images, _ = collator({"image": [big], "order": ["Diptera"], "family": [None], "species": [None]})
    assert images.shape[0] == 0 and collator.skipped_by_reason == {"too_large": 1}


def test_the_device_collator_is_picklable(demo_taxonomy: Taxonomy, image_bytes: Callable[..., bytes]) -> None:
    collator = pickle.loads(pickle.dumps(DeviceCollator(demo_taxonomy, TransformSpec(input_size=24), train=True,
                                                        device=CPU)))
    images, _ = collator({"image": [image_bytes()] * 2, "order": ["Diptera"] * 2, "family": [None] * 2,
                          "species": [None] * 2})
    assert images.shape == (2, 3, 24, 24)


def test_decode_modes_resolve_by_device() -> None:
    assert decode_on_device("gpu", CPU) and not decode_on_device("cpu", CPU) and not decode_on_device("auto", CPU)
    assert decode_on_device("auto", torch.device("cuda")) and not decode_on_device("cpu", torch.device("cuda"))


# ------------------------------------------------------------------------------------------------ background
def test_background_keeps_the_order_and_raises_the_producers_error() -> None:
    assert list(background(iter(range(20)), CPU)) == list(range(20))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("shard unreadable")

    results = []
    with pytest.raises(ValueError, match="shard unreadable"):
        for item in background(failing(), CPU):
            results.append(item)
    assert results == [1]


def test_background_stops_and_closes_the_source_when_the_consumer_leaves_early() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    batches = background(endless(), CPU)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    batches.close()  # what a loop does on `break` (max_steps_per_epoch)
    assert closed.wait(30)
    assert not any(t.name == "taxonet-batches" and t.is_alive() for t in threading.enumerate())
