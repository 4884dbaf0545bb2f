"""Predictor: image bytes → ranked predictions per taxonomic rank, sure/unsure per rank and the lowest reliable rank.

Plain PyTorch + NumPy, no Ray: Ray Serve (``taxonet.serve``), the CLI and the GPU benchmark all call this. The
preprocessing is rebuilt from the checkpoint's ``transform.json`` (:class:`Preprocessor`); nothing here restates input
size or normalisation.

One answer per image (documented with examples in docs/api.md)::

    {"ranks": {"order": {"top_k": [{"label": "Hymenoptera", "probability": 0.93}, ...],
                         "label": "Hymenoptera", "score": 7.1, "reliable": true, "confidence": 0.64},
               "family": {...}, "species": {...}},
     "lowest_reliable_rank": "family", "lowest_reliable_label": "Apidae", "consistent": true}

``score`` is the winning raw logit (the paper's anomaly score), ``reliable`` says it passed the class's threshold
τ = μ − k·σ, ``confidence`` is Φ((score − μ)/σ) (null where the class has no fitted threshold), ``consistent`` says
the per-rank winners form a chain of the taxonomy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from taxonet.data.transforms import (DEFAULT_MAX_PIXELS, ImageDecodeError, TransformSpec, build_eval_resize,
                                     decode_image, normalize_uint8)
from taxonet.taxonomy import Taxonomy

log = logging.getLogger(__name__)

#: the image formats the serving contract accepts, by their leading bytes (the Content-Type header can lie)
SERVED_FORMATS = ("JPEG", "PNG", "WEBP")


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"), else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and len(data) >= 26 and data[6:10] == b"\x00\x00\x00\x00":  # BMP: reserved zeros
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


#: JPEG start-of-frame markers (baseline, progressive, lossless, ... ; not DHT 0xC4, JPG 0xC8, DAC 0xCC)
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, walking the marker segments; None if not found.

    A few microseconds, against tens for opening the image with PIL: cheap enough to check every image's pixel
    count before handing a batch to nvjpeg.
    """
    if data[:2] != b"\xff\xd8":
        return None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers carry no length
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if marker in _SOF_MARKERS:
            if position + 9 > end:
                return None
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any frame header: malformed
            return None
        position += 2 + length
    return None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" → the first CUDA device when there is one, else the CPU; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA device is visible")
    return resolved


class Preprocessor:
    """Bytes → normalised float tensor [3, S, S], exactly as the checkpoint's eval transform says.

    Decoding refuses corrupt, unsupported and oversized images with :class:`ImageDecodeError` (``code`` corrupt,
    unsupported or too_large); ``allowed_formats`` narrows what is accepted (serving: JPEG, PNG, WebP).
    """

    def __init__(self, spec: TransformSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 allowed_formats: Sequence[str] | None = None) -> None:
        self.spec = spec
        self.max_pixels = int(max_pixels)
        self.allowed_formats = tuple(allowed_formats) if allowed_formats else None
        self._resize = build_eval_resize(spec)
        # JPEG draft decoding at twice the input size: DCT scaling makes big photos several times cheaper to decode,
        # and keeping 2× headroom leaves the final antialiased resize (and so the pixels) close to a full decode.
        self._draft_size = 2 * spec.input_size

    @property
    def key(self) -> str:
        """A string identifying the transform: two preprocessors with the same key give the same tensors."""
        return spec_key(self.spec)

    def check_format(self, data: bytes) -> str | None:
        """The sniffed format; ImageDecodeError("unsupported") when it is a known format outside ``allowed_formats``."""
        found = sniff_format(data)
        if self.allowed_formats and found is not None and found not in self.allowed_formats:
            raise ImageDecodeError("unsupported", f"{found} images are not accepted; send "
                                                  f"{', '.join(self.allowed_formats)}")
        return found

    def __call__(self, data: bytes) -> torch.Tensor:
        # the sniffer knows every format decode_image accepts (MPO, the phones' multi-picture JPEG, sniffs as JPEG);
        # anything it does not know is refused by the decoder itself
        return normalize_uint8(self.decode_uint8(data), self.spec)

    def decode_uint8(self, data: bytes) -> torch.Tensor:
        """Bytes → resized uint8 [3, S, S], the same checks; :meth:`Predictor.predict_tensors` normalises it."""
        self.check_format(data)
        image = decode_image(data, max_pixels=self.max_pixels, draft_size=self._draft_size)
        return self._resize(image)


def spec_key(spec: TransformSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def freeze_for_cpu(model: torch.nn.Module, input_size: int, *, atol: float = 1e-4) -> torch.nn.Module | None:
    """The model as a frozen TorchScript graph for CPU inference, or None where that fails or changes the output.

    Why: an eager forward pass re-enters Python between every op and needs the GIL each time. In a Serve replica the
    GIL is shared with the thread that receives requests, and every hand-over costs the forward pass up to Python's
    switch interval — a busy second thread made an eager ResNet50 forward 7–10× slower, the graph ~1.2×
    (tests/bench/bench_gil.py): the graph runs op to op in C++ without the GIL. Freezing also folds batch norm into the convolutions (fewer ops on CPU).

    ``torch.jit`` is deprecated in recent PyTorch (its warnings are silenced here) and may go: then, or if tracing
    fails, or if the graph's logits differ from the eager model's by more than ``atol`` on a random batch, this
    returns None and the caller keeps the eager model.
    """
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            example = torch.rand(2, 3, input_size, input_size)
            graph = torch.jit.freeze(torch.jit.trace(model, example, strict=False, check_trace=False))
            check = torch.rand(3, 3, input_size, input_size)  # another batch size: the graph must not fix it
            expected, got = model(check), graph(check)
            if set(expected) != set(got):
                raise ValueError(f"graph outputs {sorted(got)}, the model {sorted(expected)}")
            for rank, values in expected.items():
                if got[rank].shape != values.shape or not torch.allclose(got[rank], values, atol=atol, rtol=1e-3):
                    raise ValueError(f"graph logits for {rank} differ from the model's "
                                     f"(max |Δ| {(got[rank] - values).abs().max().item():.3g})")
    except Exception as exc:  # anything from torch.jit: serve the eager model rather than fail the load
        log.warning("taxonet: keeping the eager model on CPU (no TorchScript graph: %s)", exc)
        return None
    finally:
        model.train(was_training)
    return graph


class Predictor:
    """A loaded model plus its taxonomy, preprocessing and anomaly thresholds; answers batches of images.

    Build it with :meth:`from_checkpoint`. ``predict_tensors`` takes already-preprocessed images, ``predict_bytes``
    encoded ones. On CUDA the forward runs under bf16 autocast with channels_last inputs; on CPU, with ``graph``
    (default), through a frozen TorchScript graph (:func:`freeze_for_cpu`), which runs without holding the GIL.
    """

    def __init__(self, model: torch.nn.Module, taxonomy: Taxonomy, transform: TransformSpec, thresholds: Any | None,
                 *, device: str | torch.device = "cpu", top_k: int = 3, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 amp: bool = True, channels_last: bool = True, graph: bool = True,
                 info: dict[str, Any] | None = None) -> None:
        from taxonet.anomaly import AnomalyThresholds

        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.taxonomy = taxonomy
        self.transform = transform
        self.has_thresholds = thresholds is not None
        # Without fitted thresholds every class counts as sure (AnomalyThresholds' rule for classes without one),
        # so answers keep their shape and "confidence" is null.
        self.thresholds = thresholds if thresholds is not None else AnomalyThresholds([], k=0.0)
        self.top_k = int(top_k)
        self.amp = amp
        self.channels_last = channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.graph = False
        if graph and self.device.type == "cpu":
            frozen = freeze_for_cpu(self.model, transform.input_size)
            if frozen is not None:
                self.model, self.graph = frozen, True
        self.preprocessor = Preprocessor(transform, max_pixels=max_image_pixels)
        self.ranks = tuple(getattr(model, "ranks", taxonomy.ranks))
        self.info = dict(info or {})

    @classmethod
    def from_checkpoint(cls, uri: str, device: str | torch.device = "auto", *, top_k: int = 3,
                        max_image_pixels: int = DEFAULT_MAX_PIXELS, amp: bool = True, channels_last: bool = True,
                        graph: bool = True, cache_dir: str | None = None) -> "Predictor":
        """Load a checkpoint directory (local path, file:// or s3://) onto ``device`` ("auto": CUDA if any)."""
        from taxonet.checkpoint import load_checkpoint

        resolved = resolve_device(device)
        loaded = load_checkpoint(uri, device=resolved, cache_dir=cache_dir)
        model_json = getattr(loaded.config, "model", None)
        info = {
            "name": loaded.name,
            "version": loaded.version,
            "checkpoint": str(uri),
            "created": loaded.manifest.get("created"),
            "backbone": getattr(model_json, "backbone", None),
            "single_task": bool(getattr(model_json, "single_task", False)),
        }
        return cls(loaded.model, loaded.taxonomy, loaded.transform, loaded.thresholds, device=resolved, top_k=top_k,
                   max_image_pixels=max_image_pixels, amp=amp, channels_last=channels_last, graph=graph, info=info)

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return str(self.info.get("name", "taxonet"))

    @property
    def version(self) -> str:
        return str(self.info.get("version", ""))

    def describe(self) -> dict[str, Any]:
        """What GET /v1/model shows: name, version, checkpoint, ranks, input transform, device."""
        return {
            **self.info,
            "ranks": list(self.taxonomy.ranks),
            "heads": list(self.ranks),
            "classes": {rank: self.taxonomy.num_classes(rank) for rank in self.taxonomy.ranks},
            "transform": self.transform.to_dict(),
            "thresholds": self.has_thresholds,
            "anomaly_k": self.thresholds.k if self.has_thresholds else None,
            "top_k": self.top_k,
            "device": str(self.device),
            "graph": self.graph,
        }

    # ------------------------------------------------------------------ inference
    def preprocess(self, data: bytes) -> torch.Tensor:
        """Decode (with the pixel limit) and apply the checkpoint's eval transform: float32 [3, S, S]."""
        return self.preprocessor(data)

    def logits(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """Model output for a preprocessed batch [N, 3, S, S]: {rank: float32 [N, C]} on the host."""
        return self._collect(self._launch(batch))

    @torch.inference_mode()
    def _launch(self, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        """Start the forward pass; on CUDA it runs asynchronously and the logits are copied back without blocking."""
        images = batch.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:  # resized pixels from Preprocessor.decode_uint8: normalise on the device
            images = normalize_uint8(images, self.transform)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.amp):
            output = self.model(images)
        if self.device.type != "cuda":
            return {rank: values.float() for rank, values in output.items()}, None
        # non_blocking device→host copies land in pinned memory; the event says when they (and the forward) are done
        host = {rank: values.float().to("cpu", non_blocking=True) for rank, values in output.items()}
        done = torch.cuda.Event()
        done.record()
        return host, done

    @staticmethod
    def _collect(launched: tuple[dict[str, torch.Tensor], Any]) -> dict[str, np.ndarray]:
        host, done = launched
        if done is not None:
            done.synchronize()
        return {rank: values.numpy() for rank, values in host.items()}

    def predict_tensors(self, batch: torch.Tensor) -> list[dict[str, Any]]:
        """Answers for a preprocessed batch [N, 3, S, S] (or one image [3, S, S]): float32 from :meth:`preprocess`,
        or uint8 from ``preprocessor.decode_uint8`` (normalised here, on the model's device)."""
        return self.answers(self.logits(self._check_batch(batch)))

    @staticmethod
    def _check_batch(batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise ValueError(f"expected a batch [N, 3, H, W] with N ≥ 1, got shape {tuple(batch.shape)}")
        return batch

    def predict_stream(self, batches: Iterable[torch.Tensor]) -> Iterator[list[dict[str, Any]]]:
        """Answers batch by batch, pipelined: batch i+1 is fetched (decoded) and launched on the device before the
        host builds batch i's answers, so on a GPU the CPU work overlaps the forward passes. Same answers as
        :meth:`predict_tensors` on each batch."""
        pending = None
        for batch in batches:
            launched = self._launch(self._check_batch(batch))
            if pending is not None:
                yield self.answers(self._collect(pending))
            pending = launched
        if pending is not None:
            yield self.answers(self._collect(pending))

    def predict_bytes(self, images: Sequence[bytes], *, batch_size: int = 64, decode_threads: int = 0,
                      decode_on_device: bool = False) -> list[dict[str, Any]]:
        """Answers for encoded images, ``batch_size`` at a time. A bad image raises ImageDecodeError naming its index.

        ``decode_threads`` > 0 decodes on the CPU in a thread pool (PIL releases the GIL while decoding and
        resizing); ``decode_on_device`` decodes JPEGs on the GPU instead (:meth:`preprocess_jpeg_on_device`).
        Decoding of the next batch overlaps the forward pass of the current one (:meth:`predict_stream`).
        """
        batch_size = max(1, int(batch_size))
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(decode_threads)) if decode_threads > 0 else None

            def batches() -> Iterator[torch.Tensor]:
                for start in range(0, len(images), batch_size):
                    chunk = images[start:start + batch_size]
                    if decode_on_device:
                        yield self.preprocess_jpeg_on_device(chunk, first_index=start)
                    else:
                        jobs = [(start + offset, data) for offset, data in enumerate(chunk)]
                        mapper = pool.map if pool is not None else map
                        yield torch.stack(list(mapper(self._indexed_preprocess, jobs)))

            return [answer for answers in self.predict_stream(batches()) for answer in answers]

    def _indexed_preprocess(self, job: tuple[int, bytes]) -> torch.Tensor:
        index, data = job
        try:
            return self.preprocess(data)
        except ImageDecodeError as exc:
            raise ImageDecodeError(exc.code, f"image {index}: {exc.message}") from exc

    def preprocess_jpeg_on_device(self, images: Sequence[bytes], *, first_index: int = 0) -> torch.Tensor:
        """JPEGs decoded on the GPU (nvjpeg via ``torchvision.io.decode_jpeg``), resized and normalised there.

        The same squash resize and the checkpoint's mean/std as the eval transform, with an antialiased bilinear
        resize instead of PIL's (outputs agree to about 1e-2, not bit for bit). Frame headers are read first so the
        pixel limit still holds; anything that is not a JPEG, is over the limit, or that nvjpeg refuses goes through
        the CPU path, which gives the same errors as :meth:`preprocess`.
        Returns a float32 batch [N, 3, S, S] on ``self.device``.
        """
        import torch.nn.functional as functional
        from torchvision.io import ImageReadMode, decode_jpeg

        size = self.transform.input_size
        out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=self.device)
        on_device: list[int] = []
        for index, data in enumerate(images):
            dims = jpeg_size(data)
            if dims is not None and 0 < dims[0] * dims[1] <= self.preprocessor.max_pixels:
                on_device.append(index)
                continue
            out[index] = self._indexed_preprocess((first_index + index, data)).to(self.device)
        if on_device:
            encoded = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in on_device]
            try:
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one image nvjpeg cannot handle fails the batch: fall back image by image
                decoded = [None] * len(on_device)
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for position, image in enumerate(decoded):
                if image is None:
                    index = on_device[position]
                    out[index] = self._indexed_preprocess((first_index + index, images[index])).to(self.device)
                else:
                    by_shape.setdefault(tuple(image.shape), []).append(position)
            mean = torch.tensor(self.transform.mean, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(self.transform.std, device=self.device).view(1, 3, 1, 1)
            for positions in by_shape.values():  # one resize per distinct input size (pre-resized crops: one)
                stacked = torch.stack([decoded[p] for p in positions]).float().div_(255.0)
                if stacked.shape[-2:] != (size, size):
                    stacked = functional.interpolate(stacked, size=(size, size), mode="bilinear", antialias=True,
                                                     align_corners=False)
                out[torch.tensor([on_device[p] for p in positions], device=self.device)] = (stacked - mean) / std
        return out

    # ------------------------------------------------------------------ answers
    def answers(self, logits: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Turn per-rank logits into one JSON-ready answer per image (see the module docstring)."""
        from taxonet.anomaly import assess

        assessment = assess(self.taxonomy, self.thresholds, logits)
        confidence = assessment.confidence
        if confidence is None:
            confidence = np.full(assessment.scores.shape, np.nan)
        top: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for rank, values in logits.items():
            k = min(self.top_k, values.shape[1])
            shifted = values - values.max(axis=1, keepdims=True)  # stable softmax
            probabilities = np.exp(shifted)
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
            top[rank] = (order, np.take_along_axis(probabilities, order, axis=1))
        names = self.taxonomy.names
        results = []
        for row in range(len(assessment)):
            ranks: dict[str, Any] = {}
            for level, rank in enumerate(self.taxonomy.ranks):
                index = int(assessment.predictions[row, level])
                entry: dict[str, Any] = {
                    "top_k": [],
                    "label": names[level][index] if index >= 0 else None,
                    "score": _finite_or_none(assessment.scores[row, level]),
                    "reliable": bool(assessment.sure[row, level]),
                    "confidence": _finite_or_none(confidence[row, level]),
                }
                if rank in top:  # a rank without a head (single-task model) is derived from the taxonomy
                    order, probabilities = top[rank]
                    entry["top_k"] = [{"label": names[level][int(i)], "probability": round(float(p), 6)}
                                      for i, p in zip(order[row], probabilities[row])]
                ranks[rank] = entry
            level = int(assessment.lowest_reliable_level[row])
            results.append({
                "ranks": ranks,
                "lowest_reliable_rank": self.taxonomy.ranks[level] if level >= 0 else None,
                "lowest_reliable_label": names[level][int(assessment.predictions[row, level])] if level >= 0 else None,
                "consistent": bool(assessment.consistent[row]),
            })
        return results

