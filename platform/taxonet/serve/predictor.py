"""Predictor: images → ranked predictions per taxonomic rank, sure/unsure per rank and the lowest reliable rank.

Plain PyTorch + NumPy, no Ray: the Serve deployments (:mod:`taxonet.serve.app`), the CLI and the benchmarks call
this. The preprocessing is rebuilt from the checkpoint's ``transform.json`` (:class:`Preprocessor`); nothing here
restates input size or normalisation.

One answer per image is an :class:`ImageAnswer` (documented with examples in docs/api.md); the same dataclasses are
the API's response model, so the OpenAPI document and the answers come from one definition::

    {"ranks": {"order": {"top_k": [{"label": "Hymenoptera", "probability": 0.93}, ...],
                         "label": "Hymenoptera", "score": 7.1, "reliable": true, "confidence": 0.64},
               "family": {...}, "species": {...}},
     "lowest_reliable_rank": "family", "lowest_reliable_label": "Apidae", "consistent": true}

``score`` is the winning raw logit (the paper's anomaly score), ``reliable`` says it passed the class's threshold
τ = μ − k·σ, ``confidence`` is Φ((score − μ)/σ) (null where the class has no fitted threshold), ``consistent`` says
the per-rank winners form a chain of the taxonomy.

On request (:meth:`Predictor.predict_batch` with ``embed=True``: the Serve classifier asks when the review queue is
on) the predictor also returns each image's **embedding**, the model's own view of it: the pooled backbone features
R0 that the heads see, from the same forward pass, brought to at most :data:`EMBEDDING_MAX_DIMS` dimensions
(:func:`embedding_projection`), L2-normalised, float16. Embeddings never appear in answers to clients; the review
page groups queued crops whose embeddings' cosine is high (look-alikes).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from taxonet.anomaly import AnomalyThresholds, assess
from taxonet.checkpoint import load_checkpoint
from taxonet.data.transforms import (DEFAULT_MAX_PIXELS, ImageDecodeError, TransformSpec, build_eval_resize,
                                     load_rgb, normalize_uint8, open_image)
from taxonet.devices import autocast, resolve_device
from taxonet.models.heads import FEATURES_KEY, HierarchicalClassifier, WithFeatures
from taxonet.taxonomy import Taxonomy

log = logging.getLogger(__name__)

#: the image formats the serving contract accepts, by their leading bytes (the Content-Type header can lie); the
#: decoder is opened with exactly these (PIL's ``formats=``), so nothing else is ever parsed
SERVED_FORMATS = ("JPEG", "PNG", "WEBP")
#: labels with probabilities per rank in every answer, unless configured otherwise
DEFAULT_TOP_K = 3
#: most dimensions of an embedding (wider backbone features are projected down: :func:`embedding_projection`); the
#: review queue stores one per queued crop, 2 bytes a dimension in transit
EMBEDDING_MAX_DIMS = 128
#: seed of that projection: the same matrix on every replica and every load, so one model's embeddings compare
EMBEDDING_SEED = 20261201


# ---------------------------------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class TopK:
    label: str
    probability: float


@dataclass(frozen=True)
class RankAnswer:
    """One rank of one answer: the top-k labels, the winner, its raw score and whether it passed its threshold."""

    top_k: list[TopK]
    label: str | None
    score: float | None
    reliable: bool
    confidence: float | None


@dataclass(frozen=True)
class ImageAnswer:
    """The answer for one image; ``filename`` is the multipart part's file name (null for a raw body)."""

    ranks: dict[str, RankAnswer]
    lowest_reliable_rank: str | None
    lowest_reliable_label: str | None
    consistent: bool
    filename: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as in the API's answers (without ``filename`` when there is none: an in-process answer)."""
        data = asdict(self)
        if self.filename is None:
            del data["filename"]
        return data


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True)
class BatchPrediction:
    """A batch's answers and, when asked for, its embeddings: float16 [N, D], each row of unit L2 norm (None when
    not asked, or for a model without pooled features to give)."""

    answers: list[ImageAnswer]
    embeddings: np.ndarray | None = None


@dataclass(frozen=True)
class ClassifyResponse:
    """Body of a successful POST /v1/classify: the model that answered and one answer per image, in order."""

    model: ModelRef
    predictions: list[ImageAnswer] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- decoding
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
    if data[:2] == b"BM" and len(data) >= 26:  # any BMP, whatever its reserved bytes say
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF and BigTIFF
        return "TIFF"
    return None


def spec_key(spec: TransformSpec) -> str:
    """A string identifying a transform: two preprocessors with the same key give the same tensors."""
    return json.dumps(spec.to_dict(), sort_keys=True)


class Preprocessor:
    """Bytes → resized uint8 [3, S, S] (or the normalised float tensor), exactly as the checkpoint's eval transform.

    Two steps, so that a server can check every image of a request before it decodes any: :meth:`open` reads the
    header only (format, size) and refuses what is not allowed with :class:`ImageDecodeError` (``code`` corrupt,
    unsupported or too_large); :meth:`decode` then decodes and resizes. ``allowed_formats`` restricts the decoder
    itself (serving: JPEG, PNG, WebP); without it every format :func:`taxonet.data.transforms.open_image` knows.
    """

    def __init__(self, spec: TransformSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 allowed_formats: Sequence[str] | None = None) -> None:
        self.spec = spec
        self.max_pixels = int(max_pixels)
        self.allowed_formats = tuple(allowed_formats) if allowed_formats else None
        self.key = spec_key(spec)
        self._resize = build_eval_resize(spec)
        # JPEG draft decoding at twice the input size: DCT scaling makes big photos several times cheaper to decode,
        # and keeping 2× headroom leaves the final antialiased resize (and so the pixels) close to a full decode.
        self._draft_size = 2 * spec.input_size

    def check_format(self, data: bytes) -> str | None:
        """The sniffed format; ImageDecodeError("unsupported") when it is a known format outside ``allowed_formats``."""
        found = sniff_format(data)
        if self.allowed_formats and found is not None and found not in self.allowed_formats:
            raise ImageDecodeError("unsupported", f"{found} images are not accepted; send "
                                                  f"{', '.join(self.allowed_formats)}")
        return found

    def open(self, data: bytes) -> Image.Image:
        """The image with only its header read: format allowed, size within ``max_pixels``. Nothing decoded yet."""
        self.check_format(data)
        return open_image(data, max_pixels=self.max_pixels, formats=self.allowed_formats)

    def decode(self, image: Image.Image) -> torch.Tensor:
        """An image from :meth:`open` → resized uint8 [3, S, S] (:meth:`Predictor.predict_tensors` normalises it).
        The image is closed afterwards: its full-size pixels are freed at once, whoever still refers to it."""
        try:
            return self._resize(load_rgb(image, draft_size=self._draft_size))
        finally:
            image.close()

    def decode_uint8(self, data: bytes) -> torch.Tensor:
        """Bytes → resized uint8 [3, S, S]: :meth:`open` then :meth:`decode`."""
        return self.decode(self.open(data))

    def __call__(self, data: bytes) -> torch.Tensor:
        """Bytes → the eval transform's normalised float32 [3, S, S]."""
        return normalize_uint8(self.decode_uint8(data), self.spec)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def freeze_for_cpu(model: torch.nn.Module, input_size: int, *, atol: float = 1e-4) -> torch.nn.Module | None:
    """The model as a frozen TorchScript graph for CPU inference, or None where that fails or changes the output.

    Why: an eager forward pass re-enters Python between every op and needs the GIL each time. In a Serve replica the
    GIL is shared with the thread that receives requests, and every hand-over costs the forward pass up to Python's
    switch interval — a busy second thread made an eager ResNet50 forward 7–10× slower, the graph ~1.2×
    (tests/bench/bench_gil.py): the graph runs op to op in C++ without the GIL. Freezing also folds batch norm into
    the convolutions (fewer ops on CPU).

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


def embedding_projection(feature_dim: int, max_dims: int = EMBEDDING_MAX_DIMS,
                         seed: int = EMBEDDING_SEED) -> torch.Tensor | None:
    """The fixed map from ``feature_dim`` backbone features to an embedding of at most ``max_dims``: None (features
    kept as they are) when ``feature_dim ≤ max_dims``, else a seeded Gaussian random matrix [feature_dim, max_dims].

    A random projection keeps cosines approximately (Johnson–Lindenstrauss): for unit vectors u, v the projected
    squared distance ‖Pu − Pv‖² (P scaled by 1/√k) is ‖u − v‖² = 2 − 2·cos(u, v) within a relative error of about
    √(2/k) (one standard deviation; k = ``max_dims``: 12.5 % at 128), so near neighbours stay near neighbours and
    far ones stay far. Built from ``seed`` on the CPU (the same matrix on every device and every load).
    """
    if feature_dim <= max_dims:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(feature_dim, max_dims, generator=generator) / math.sqrt(max_dims)


def embed_features(features: torch.Tensor, projection: torch.Tensor | None) -> np.ndarray:
    """Pooled features [N, F] → embeddings float16 [N, D] on the host: projected (if ``projection``), then
    L2-normalised in float32 (a zero vector stays zero)."""
    values = features.float()
    if projection is not None:
        values = values @ projection.to(values.device)
    return functional.normalize(values, dim=1).to(torch.float16).cpu().numpy()


# ---------------------------------------------------------------------------------------------------- predictor
class Predictor:
    """A loaded model plus its taxonomy, preprocessing and anomaly thresholds; answers batches of images.

    Build it with :meth:`from_checkpoint`. :meth:`predict_tensors` takes preprocessed images (what a Serve replica
    runs), :meth:`predict_bytes` encoded ones; :meth:`predict_batch` adds embeddings on request. On CUDA the forward
    runs under bf16 autocast with channels_last inputs; on CPU, with ``graph`` (default), through a frozen TorchScript
    graph (:func:`freeze_for_cpu`), which runs without holding the GIL.

    A :class:`~taxonet.models.HierarchicalClassifier` runs as :class:`~taxonet.models.WithFeatures`: every forward
    pass also yields the pooled features (they are computed anyway; left on the device unless embeddings are asked
    for), so an embedding never costs a second pass. Any other module (``{rank: logits}`` only) gives no embeddings.
    """

    def __init__(self, model: torch.nn.Module, taxonomy: Taxonomy, transform: TransformSpec,
                 thresholds: AnomalyThresholds | None, *, device: str | torch.device = "cpu",
                 top_k: int = DEFAULT_TOP_K, max_image_pixels: int = DEFAULT_MAX_PIXELS, amp: bool = True,
                 channels_last: bool = True, graph: bool = True, info: dict[str, Any] | None = None) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.device = resolve_device(device)
        #: whether the model yields pooled features (and so embeddings)
        self.has_features = isinstance(model, HierarchicalClassifier)
        if self.has_features:
            model = WithFeatures(model)
        self.model = model.to(self.device).eval()
        projection = embedding_projection(model.feature_dim) if self.has_features else None
        self._projection = projection.to(self.device) if projection is not None else None
        #: dimensions of the embeddings (0: the model gives none)
        self.embedding_dims = (min(model.feature_dim, EMBEDDING_MAX_DIMS) if self.has_features else 0)
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
    def from_checkpoint(cls, uri: str, device: str | torch.device = "auto", *, top_k: int = DEFAULT_TOP_K,
                        max_image_pixels: int = DEFAULT_MAX_PIXELS, amp: bool = True, channels_last: bool = True,
                        graph: bool = True, cache_dir: str | None = None) -> Predictor:
        """Load a checkpoint directory (local path, file:// or s3://) onto ``device`` ("auto": CUDA if any)."""
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

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)

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

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, *, embed: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Model output for a preprocessed batch [N, 3, S, S] (float32, or uint8 pixels normalised here on the
        device): ({rank: float32 [N, C]} on the host, the embeddings if ``embed`` and the model has features, else
        None) — one forward pass either way."""
        images = batch.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:  # resized pixels from Preprocessor.decode: normalise on the device
            images = normalize_uint8(images, self.transform)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            output = dict(self.model(images))
        features = output.pop(FEATURES_KEY, None)
        embeddings = embed_features(features, self._projection) if embed and features is not None else None
        return {rank: values.float().cpu().numpy() for rank, values in output.items()}, embeddings

    def logits(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """{rank: float32 [N, C]} on the host for a preprocessed batch (see :meth:`forward`)."""
        return self.forward(batch)[0]

    def predict_tensors(self, batch: torch.Tensor) -> list[ImageAnswer]:
        """Answers for a preprocessed batch [N, 3, S, S] (or one image [3, S, S]): float32 from :meth:`preprocess`,
        or uint8 from ``preprocessor.decode_uint8`` (normalised here, on the model's device)."""
        return self.predict_batch(batch).answers

    def predict_batch(self, batch: torch.Tensor, *, embed: bool = False) -> BatchPrediction:
        """:meth:`predict_tensors`'s answers and, with ``embed``, each image's embedding from the same forward pass:
        float16 [N, D], L2-normalised, ``D = embedding_dims`` (None where the model has no pooled features)."""
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise ValueError(f"expected a batch [N, 3, H, W] with N ≥ 1, got shape {tuple(batch.shape)}")
        logits, embeddings = self.forward(batch, embed=embed)
        return BatchPrediction(answers=self.answers(logits), embeddings=embeddings)

    def predict_bytes(self, images: Sequence[bytes], *, batch_size: int = 32) -> list[ImageAnswer]:
        """Answers for encoded images, ``batch_size`` at a time, each decoded just before its batch runs (at most one
        batch of pixels in memory). A bad image raises :class:`ImageDecodeError` naming its index."""
        answers: list[ImageAnswer] = []
        for start in range(0, len(images), max(1, batch_size)):
            tensors = []
            for index, data in enumerate(images[start:start + max(1, batch_size)], start=start):
                try:
                    tensors.append(self.preprocessor.decode_uint8(data))
                except ImageDecodeError as exc:
                    raise ImageDecodeError(exc.code, f"image {index}: {exc.message}") from exc
            answers.extend(self.predict_tensors(torch.stack(tensors)))
        return answers

    def preprocess_jpeg_on_device(self, images: Sequence[bytes]) -> torch.Tensor:
        """JPEGs decoded on the model's device (nvjpeg through ``torchvision.io.decode_jpeg`` on CUDA, libjpeg on the
        CPU), resized and normalised there: float32 [N, 3, S, S] on ``self.device``.

        What GPU serving runs for JPEGs (``jpeg_decode``, docs/api.md): the ingress has checked the headers (format,
        pixel limits) and sends the bytes; the host never holds the decoded pixels. The same squash resize and the
        checkpoint's mean/std as the eval transform, with an antialiased bilinear resize instead of PIL's (outputs
        agree to about 1e-2, not bit for bit). A batch the device decoder refuses is decoded image by image with PIL
        (:meth:`preprocess`, the same errors).
        """
        size = self.transform.input_size
        out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=self.device)
        mean = torch.tensor(self.transform.mean, device=self.device).view(3, 1, 1)
        std = torch.tensor(self.transform.std, device=self.device).view(3, 1, 1)
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(
                [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images], mode=ImageReadMode.RGB,
                device=self.device))
        except RuntimeError:  # one image the device decoder cannot handle fails the call: fall back image by image
            decoded = [None] * len(images)
        for index, image in enumerate(decoded):
            if image is None:
                out[index] = self.preprocess(images[index]).to(self.device)
                continue
            pixels = image.unsqueeze(0).float().div_(255.0)
            if pixels.shape[-2:] != (size, size):
                pixels = functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
            out[index] = (pixels[0] - mean) / std
        return out

    # ------------------------------------------------------------------ answers
    def answers(self, logits: dict[str, np.ndarray]) -> list[ImageAnswer]:
        """Turn per-rank logits into one answer per image (see the module docstring)."""
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
            ranks: dict[str, RankAnswer] = {}
            for level, rank in enumerate(self.taxonomy.ranks):
                index = int(assessment.predictions[row, level])
                top_k: list[TopK] = []
                if rank in top:  # a rank without a head (single-task model) is derived from the taxonomy
                    order, probabilities = top[rank]
                    top_k = [TopK(label=names[level][int(i)], probability=round(float(p), 6))
                             for i, p in zip(order[row], probabilities[row])]
                ranks[rank] = RankAnswer(top_k=top_k, label=names[level][index] if index >= 0 else None,
                                         score=_finite_or_none(assessment.scores[row, level]),
                                         reliable=bool(assessment.sure[row, level]),
                                         confidence=_finite_or_none(confidence[row, level]))
            level = int(assessment.lowest_reliable_level[row])
            results.append(ImageAnswer(
                ranks=ranks,
                lowest_reliable_rank=self.taxonomy.ranks[level] if level >= 0 else None,
                lowest_reliable_label=names[level][int(assessment.predictions[row, level])] if level >= 0 else None,
                consistent=bool(assessment.consistent[row]),
            ))
        return results


__all__ = ["BatchPrediction", "ClassifyResponse", "DEFAULT_TOP_K", "EMBEDDING_MAX_DIMS", "EMBEDDING_SEED",
           "ImageAnswer", "ModelRef", "Predictor", "Preprocessor", "RankAnswer", "SERVED_FORMATS", "TopK",
           "embed_features", "embedding_projection", "freeze_for_cpu", "sniff_format", "spec_key"]
