"""Decoding and augmenting a training batch on the worker's device (``data.decode: gpu``). No Ray here.

The CPU path (:class:`taxonet.data.pipeline.Collator`) decodes every JPEG with PIL and runs torchvision's transforms
image by image in the worker's threads; at the paper's 128 px input one H100 trains faster than a node's cores decode
(docs/scaling.md). :class:`DeviceCollator` instead

1. reads the JPEG headers on the CPU (size check against ``max_pixels``: a decompression bomb is refused before it is
   decoded) and hands the compressed bytes, as uint8, to one batched ``torchvision.io.decode_jpeg(..., device=...)``
   call: nvjpeg on a CUDA device, libjpeg on the CPU (the same code path, which the tests run);
2. resizes on the device, one ``interpolate`` per distinct image size (none at all for shards that ``taxonet prepare
   --train-size`` stored at the input size);
3. applies the paper's augmentations (METHOD.md "Training") to the whole batch at once, with per-image random
   parameters: rotation ±40° and scale 0.85–1.15, horizontal and vertical flips, perspective 0.2 (p = 0.5) composed
   into one homography per image and sampled once (``grid_sample``, black fill as torchvision's), then colour jitter
   0.5 (brightness, contrast, saturation; their order drawn per batch, torchvision draws it per image);
4. normalises, giving the same float32 ``[N, 3, S, S]`` tensors, labels and skip accounting as the CPU path.

Records that are not baseline/progressive JPEG (or that nvjpeg refuses) fall back to the CPU decode of
:func:`taxonet.data.transforms.decode_image` one by one; corrupt ones are skipped and counted as on the CPU path.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from taxonet.data.pipeline import Collator
from taxonet.data.transforms import ImageDecodeError, TransformSpec, build_eval_resize, decode_image
from taxonet.taxonomy import Taxonomy

#: the paper's augmentation strengths (METHOD.md "Training"), as torchvision's transforms in transforms.py use them
ROTATION_DEGREES = 40.0
SCALE_RANGE = (0.85, 1.15)
PERSPECTIVE_DISTORTION = 0.2
PERSPECTIVE_P = 0.5
JITTER = 0.5
#: ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
_LUMA = (0.2989, 0.587, 0.114)
#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT C4, JPG C8, DAC CC)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

T = TypeVar("T")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header without decoding; None if ``data`` is not a JPEG."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    position, end = 2, len(data)
    while position + 9 < end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in _SOF_MARKERS:
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            return width, height
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


class DeviceCollator(Collator):
    """Column batch → ``(images float32 [N, 3, S, S], targets int64 [N, depth])``, both on ``device``.

    The drop-in for :class:`Collator` when ``data.decode`` resolves to the device (see the module docstring);
    ``seed`` seeds the augmentation parameters (drawn on the CPU, one small tensor per batch).
    """

    def __init__(self, taxonomy: Taxonomy, spec: TransformSpec, train: bool, device: torch.device, *,
                 augment: bool = True, max_pixels: int | None = None, seed: int = 0) -> None:
        super().__init__(taxonomy, spec, train, threads=1, augment=augment, max_pixels=max_pixels)
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._cpu_resize = build_eval_resize(spec)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_cpu_resize"] = None
        state["generator"] = self.generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("generator")
        super().__setstate__(state)
        self.generator = torch.Generator()
        self.generator.set_state(generator_state)
        self._cpu_resize = build_eval_resize(self.spec)

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.spec.input_size
        todo, targets = self._targets(batch)
        decoded = self._decode_all([batch["image"][i] for i in todo])
        images, kept = [], []
        for i, result in zip(todo, decoded):
            if isinstance(result, Exception):
                self._skip(getattr(result, "code", type(result).__name__), str(result))
            else:
                images.append(result)
                kept.append(targets[i])
        if not images:
            return (torch.empty((0, 3, size, size), dtype=torch.float32, device=self.device),
                    torch.empty((0, self.taxonomy.depth), dtype=torch.long, device=self.device))
        pixels = self._resize(images)  # float32 [N, 3, S, S] in 0..255
        if self.train and self.augment:
            pixels = augment_batch(pixels.div_(255.0), self.generator)
        else:
            pixels = pixels.div_(255.0)
        mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        labels = torch.tensor(kept, dtype=torch.long).to(self.device, non_blocking=True)
        return (pixels - mean) / std, labels

    # -------------------------------------------------------------------------------------------- decode
    def _decode_all(self, records: list[Any]) -> list[torch.Tensor | Exception]:
        """uint8 [3, H, W] on the device per record (in order), or the reason it cannot be used."""
        results: list[torch.Tensor | Exception | None] = [None] * len(records)
        jpegs: list[int] = []
        for index, data in enumerate(records):
            if data is None:
                results[index] = ImageDecodeError("corrupt", "null image")
                continue
            dimensions = jpeg_size(data)
            if dimensions is None:  # not a JPEG (or no frame header): PIL decides what it is
                results[index] = self._decode_on_cpu(data)
            elif dimensions[0] * dimensions[1] > self.max_pixels or min(dimensions) <= 0:
                results[index] = ImageDecodeError(
                    "too_large" if min(dimensions) > 0 else "corrupt",
                    f"image has {dimensions[0]}x{dimensions[1]} pixels (limit {self.max_pixels})")
            else:
                jpegs.append(index)
        if jpegs:
            encoded = [torch.frombuffer(bytearray(records[i]), dtype=torch.uint8) for i in jpegs]
            try:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad record fails the batched call: find it one by one
                images = [self._decode_one(tensor, records[i]) for tensor, i in zip(encoded, jpegs)]
            for index, image in zip(jpegs, images):
                results[index] = image
        return [r if r is not None else ImageDecodeError("corrupt", "not decoded") for r in results]

    def _decode_one(self, encoded: torch.Tensor, data: bytes) -> torch.Tensor | Exception:
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return self._decode_on_cpu(data)

    def _decode_on_cpu(self, data: bytes) -> torch.Tensor | Exception:
        """PIL's decode (every format the CPU path takes, same checks), resized to the input size, as uint8."""
        try:
            return self._cpu_resize(decode_image(bytes(data), max_pixels=self.max_pixels)).to(self.device)
        except ImageDecodeError as exc:
            return exc
        except Exception as exc:  # an odd image must not end the epoch
            return exc

    def _resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """float32 [N, 3, S, S] (0..255): one bilinear, antialiased interpolate per distinct source size."""
        size = self.spec.input_size
        out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(index)
        for shape, indices in groups.items():
            stacked = torch.stack([images[i] for i in indices]).float()
            if shape != (size, size):
                stacked = F.interpolate(stacked, size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False).clamp_(0.0, 255.0)
            out[torch.tensor(indices, device=self.device)] = stacked
        return out


# ------------------------------------------------------------------------------------------------ augmentation
def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _perspective_inverse(displacement: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] homographies (normalised coordinates) taking each output point back to the input, for image corners
    moved inward by ``displacement`` [N, 4, 2] (fractions of the half side), as torchvision's RandomPerspective."""
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    inward = -corners.sign()
    ends = corners + inward * displacement  # where the corners land in the output
    n = displacement.shape[0]
    system = torch.zeros((n, 8, 8), dtype=torch.float64)
    rhs = torch.zeros((n, 8), dtype=torch.float64)
    for k in range(4):  # output point (x, y) = ends[k] maps to input point (u, v) = corners[k]
        x, y = ends[:, k, 0], ends[:, k, 1]
        u, v = corners[k]
        system[:, 2 * k, 0], system[:, 2 * k, 1], system[:, 2 * k, 2] = x, y, 1.0
        system[:, 2 * k, 6], system[:, 2 * k, 7] = -x * u, -y * u
        system[:, 2 * k + 1, 3], system[:, 2 * k + 1, 4], system[:, 2 * k + 1, 5] = x, y, 1.0
        system[:, 2 * k + 1, 6], system[:, 2 * k + 1, 7] = -x * v, -y * v
        rhs[:, 2 * k], rhs[:, 2 * k + 1] = u, v
    solution = torch.linalg.solve(system, rhs)
    return torch.cat([solution, torch.ones((n, 1), dtype=torch.float64)], dim=1).view(n, 3, 3)


def sampling_matrices(n: int, generator: torch.Generator) -> torch.Tensor:
    """[N, 3, 3] output → input maps of the geometric augmentations (affine, flips, perspective), float64 on CPU."""
    angle = _uniform(generator, n, -ROTATION_DEGREES, ROTATION_DEGREES) * math.pi / 180.0
    scale = _uniform(generator, n, *SCALE_RANGE)
    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    perspective = (torch.rand(n, generator=generator) < PERSPECTIVE_P).double().view(n, 1, 1)
    displacement = torch.rand((n, 4, 2), generator=generator, dtype=torch.float64) * PERSPECTIVE_DISTORTION
    # inverse of the forward chain affine → flips → perspective: A⁻¹ · F · P⁻¹ (flips are their own inverse)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    affine_inverse = torch.zeros((n, 3, 3), dtype=torch.float64)
    affine_inverse[:, 0, 0], affine_inverse[:, 0, 1] = cos, sin
    affine_inverse[:, 1, 0], affine_inverse[:, 1, 1] = -sin, cos
    affine_inverse[:, 2, 2] = 1.0
    flips = torch.diag_embed(torch.stack([flip_x, flip_y, torch.ones(n, dtype=torch.float64)], dim=1))
    return affine_inverse @ flips @ _perspective_inverse(displacement * perspective)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's augmentations on float [N, 3, S, S] in [0, 1], per image, in a few batched kernels."""
    n, _, height, width = images.shape
    device = images.device
    matrices = sampling_matrices(n, generator).to(device=device, dtype=torch.float32)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).view(1, -1, 3)
    mapped = points @ matrices.transpose(1, 2)  # [N, H*W, 3]
    grid = (mapped[..., :2] / mapped[..., 2:].clamp_min(1e-6)).view(n, height, width, 2)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return color_jitter(images, generator)


def color_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 − 0.5, 1 + 0.5] per image (torchvision's ColorJitter)."""
    n = images.shape[0]
    factors = (_uniform(generator, 3 * n, 1.0 - JITTER, 1.0 + JITTER).float().view(3, n, 1, 1, 1)
               .to(images.device))
    luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    for operation in torch.randperm(3, generator=generator).tolist():
        factor = factors[operation]
        if operation == 0:  # brightness: blend with black
            images = images * factor
        elif operation == 1:  # contrast: blend with the mean grey level of the image
            grey = (images * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
            images = factor * images + (1.0 - factor) * grey
        else:  # saturation: blend with the image's greyscale
            grey = (images * luma).sum(dim=1, keepdim=True)
            images = factor * images + (1.0 - factor) * grey
        images = images.clamp(0.0, 1.0)
    return images


# ------------------------------------------------------------------------------------------------ overlap
class _End:
    """The producer's last item: the iterator ended, or failed with ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def background(items: Iterator[T], device: torch.device, depth: int = 2) -> Iterator[T]:
    """``items`` produced by a thread ``depth`` ahead of the consumer, so that reading and decoding overlap the
    training step. On CUDA the thread works on its own stream and the consumer's stream waits for each item's
    kernels (the item's tensors are recorded on the consumer's stream, so their memory is not reused early).
    Leaving the loop early (``max_steps_per_epoch``) stops the thread and closes ``items``."""
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device=device) if cuda else None
    ready: queue.Queue[tuple[T, torch.cuda.Event | None] | _End] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for item in items:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    while not stop.is_set():
                        try:
                            ready.put((item, event), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        break
            _put_end(_End())
        except BaseException as exc:  # handed to the consumer, raised there
            _put_end(_End(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def _put_end(end: _End) -> None:
        while not stop.is_set():
            try:
                ready.put(end, timeout=0.1)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=produce, name="taxonet-batches", daemon=True)
    thread.start()
    try:
        while True:
            entry = ready.get()
            if isinstance(entry, _End):
                if entry.error is not None:
                    raise entry.error
                return
            item, event = entry
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                _record_on(item, current)
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


def _record_on(item: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(item, torch.Tensor):
        if item.is_cuda:
            item.record_stream(stream)
    elif isinstance(item, (tuple, list)):
        for part in item:
            _record_on(part, stream)
