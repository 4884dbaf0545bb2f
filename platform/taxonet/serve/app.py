"""The Ray Serve application: a CPU ingress (HTTP, validation, decoding) and a batched model deployment.

    client ──HTTP──▶ TaxonetIngress (FastAPI)            ──handle──▶ TaxonetClassifier (@serve.batch)
                     auth, content type, size limits,               Predictor: batch forward, anomaly test,
                     decode + eval transform per image              top-k per rank, metrics

Import path for ``serve run`` / ``serve deploy`` / the RayService: ``taxonet.serve.app:app_builder`` with the
arguments of :class:`taxonet.serve.config.ServeArgs`. The classifier's ``user_config`` (checkpoint, top_k,
max_batch_size, batch_wait_timeout_s) is applied in place by ``reconfigure``: batching changes at once, and a new
checkpoint is loaded beside the running model and swapped in when ready, so a rollout fails no request.

The ingress preprocesses with the transform the classifier reports (from the checkpoint) and tags every tensor with
it; if a rollout changed the transform meanwhile, the classifier sends the image back and the ingress redoes it.
"""

# No `from __future__ import annotations`: the deployment classes are pickled by value, and FastAPI must resolve
# endpoint annotations (Request, ...) from real objects, not strings whose globals did not travel.
import asyncio
import hmac
import logging
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from taxonet.data.transforms import ImageDecodeError, TransformSpec, normalize_uint8
from taxonet.predictor import SERVED_FORMATS, Predictor, Preprocessor, spec_key
from taxonet.review.queue import ReviewQueueWriter
from taxonet.serve.config import ClassifierConfig, IngressSettings, ServeArgs
from taxonet.serve.errors import ERROR_RESPONSES, ApiError, error_response, install_error_handlers

log = logging.getLogger("ray.serve")

RAW_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
#: content types accepted on a multipart file part; octet-stream/absent leave the decision to the image's bytes
PART_TYPES = set(RAW_TYPES) | {"application/octet-stream", ""}
ROUTES = ("/v1/classify", "/v1/taxonomy", "/v1/model", "/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect",
          "/redoc")
STALE = "stale_transform"
#: optional client-supplied source id (camera, site) stored with crops queued for review
SOURCE_HEADER = "x-taxonet-source"


# ---------------------------------------------------------------------------------------------------- model side
@serve.deployment(name="TaxonetClassifier")
class TaxonetClassifier:
    """Holds a :class:`Predictor`; answers one request's images per call, batched image by image across callers
    by ``@serve.batch``. On CPU the model runs as a frozen TorchScript graph unless ``graph`` is False."""

    def __init__(self, device: str = "auto", defaults: dict[str, Any] | None = None, graph: bool = True) -> None:
        from taxonet.serve.metrics import ClassifierMetrics

        self._device = device
        self._graph = graph
        self._defaults = dict(defaults or {})
        self._config: ClassifierConfig | None = None
        self._predictor: Predictor | None = None
        self._rollout_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._metrics = ClassifierMetrics()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings at once; load a new checkpoint beside the old model and swap when ready.

        The first load failing fails the replica (a deploy with a bad checkpoint must not look healthy). A later
        load failing keeps the running model and reports the problem in GET /v1/model (``rollout_error``).
        """
        config = ClassifierConfig.model_validate({**self._defaults, **(user_config or {})})
        self._predict_batch.set_max_batch_size(config.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        async with self._reload_lock:
            current = self._config
            if self._predictor is not None and current is not None and current.checkpoint == config.checkpoint:
                self._predictor.top_k = config.top_k
                self._predictor.preprocessor.max_pixels = config.max_image_pixels
                self._config, self._rollout_error = config, None
                return
            try:
                predictor = await asyncio.to_thread(Predictor.from_checkpoint, config.checkpoint, self._device,
                                                    top_k=config.top_k, max_image_pixels=config.max_image_pixels,
                                                    graph=self._graph)
            except Exception as exc:
                if self._predictor is None:
                    raise
                self._rollout_error = f"checkpoint {config.checkpoint} not loaded, still serving " \
                                      f"{self._predictor.version}: {exc}"
                log.error("taxonet: %s", self._rollout_error)
                return
            self._predictor, self._config, self._rollout_error = predictor, config, None
            self._metrics.serving(predictor.name, predictor.version)
            log.info("taxonet: serving %s %s from %s on %s", predictor.name, predictor.version, config.checkpoint,
                     predictor.device)

    def check_health(self) -> None:
        if self._predictor is None:
            raise RuntimeError("no model loaded")

    def describe(self) -> dict[str, Any]:
        info = self._require().describe()
        config = self._config
        info["max_batch_size"] = config.max_batch_size if config else None
        info["batch_wait_timeout_s"] = config.batch_wait_timeout_s if config else None
        info["rollout_error"] = self._rollout_error
        return info

    def taxonomy(self) -> dict[str, Any]:
        taxonomy = self._require().taxonomy
        return {"ranks": list(taxonomy.ranks),
                "classes": {rank: list(names) for rank, names in zip(taxonomy.ranks, taxonomy.names)},
                "tree": taxonomy.tree()}

    async def classify_many(self, images: np.ndarray, transform_key: str) -> list[dict[str, Any]]:
        """Preprocessed images [N, 3, S, S] of one request → their answers in order; an image prepared with another
        transform than this replica's gets ``{"stale_transform": True}`` instead.

        One call per HTTP request, however many images it carries: Ray and Serve's per-call work (routing, the
        queue-length probe, (de)serialisation, metrics) runs in this replica's process and shares its GIL with the
        forward pass. The images still batch one by one with other requests' images in ``_predict_batch``.
        """
        return list(await asyncio.gather(*(self._predict_batch((image, transform_key)) for image in images)))

    async def classify_bytes(self, data: bytes) -> dict[str, Any]:
        """One encoded image (already validated by the ingress), preprocessed here with this replica's transform.

        The ingress's fallback while a rollout changes the transform; rare, so decoding here costs little.
        """
        for _ in range(3):  # the model could be swapped again between preprocessing and the batch
            predictor = self._require()
            image = await asyncio.to_thread(predictor.preprocessor.decode_uint8, data)
            answer = await self._predict_batch((image.numpy(), spec_key(predictor.transform)))
            if not answer.get(STALE):
                return answer
        raise RuntimeError("the model's transform kept changing during one request")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, items: list[tuple[np.ndarray, str]]) -> list[dict[str, Any]]:
        import torch

        predictor = self._require()  # one model for the whole batch, even if a rollout swaps it meanwhile
        key = spec_key(predictor.transform)
        fresh = [i for i, (_, item_key) in enumerate(items) if item_key == key]
        out: list[dict[str, Any]] = [{STALE: True}] * len(items)
        if fresh:
            arrays = [np.asarray(items[i][0]) for i in fresh]
            if all(a.dtype == np.uint8 for a in arrays):  # resized pixels (the ingress's): normalised by the predictor
                batch = torch.from_numpy(np.stack(arrays))
            else:  # float32 tensors from Predictor.preprocess, possibly mixed with pixels
                batch = torch.stack([normalize_uint8(torch.from_numpy(a), predictor.transform) if a.dtype == np.uint8
                                     else torch.from_numpy(a) for a in arrays])
            start = time.perf_counter()
            if predictor.device.type == "cuda":
                # kernels run asynchronously and the wait for them releases the GIL: a worker thread keeps the
                # replica's event loop taking requests (the next batch fills while this one runs)
                answers = await asyncio.to_thread(predictor.predict_tensors, batch)
            else:
                # On CPU the forward pass holds a core and, in Python between ops, the GIL: from a worker thread it
                # starved the event loop, so requests trickled in and batches stayed at ~1 image (ResNet50-MTL,
                # 2 cores: 14 img/s). Inline, requests queue up during the pass and the next batch takes them all.
                answers = predictor.predict_tensors(batch)
            self._metrics.batch(len(fresh), time.perf_counter() - start, answers)
            model = {"name": predictor.name, "version": predictor.version}
            for i, answer in zip(fresh, answers):
                answer["model"] = model
                out[i] = answer
        return out

    def _require(self) -> Predictor:
        if self._predictor is None:
            raise RuntimeError("no model loaded yet")
        return self._predictor


# ---------------------------------------------------------------------------------------------------- HTTP side
class TopK(BaseModel):
    label: str
    probability: float


class RankAnswer(BaseModel):
    top_k: list[TopK]
    label: str | None
    score: float | None
    reliable: bool
    confidence: float | None


class ModelRef(BaseModel):
    name: str
    version: str


class ImageAnswer(BaseModel):
    filename: str | None
    ranks: dict[str, RankAnswer]
    lowest_reliable_rank: str | None
    lowest_reliable_label: str | None
    consistent: bool


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[ImageAnswer]


_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or several as multipart/form-data parts named `files`.",
        "content": {
            **{media: {"schema": {"type": "string", "format": "binary"}}
               for media in ("image/jpeg", "image/png", "image/webp")},
            "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        },
    }
}


class _RequestMetrics:
    """Pure ASGI middleware: counts every answer by route and status, times classify requests end to end."""

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path if path in ROUTES else "other"  # bounded label values, whatever URLs clients invent
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request(route, status)
            if route == "/v1/classify":
                self.metrics.stage("total", time.perf_counter() - start)


@serve.deployment(name="TaxonetIngress")
@serve.ingress()
class TaxonetIngress:
    """HTTP front: authenticates, validates, decodes and preprocesses; the classifier does the model work."""

    def __init__(self, classifier: DeploymentHandle, settings: IngressSettings | dict[str, Any]) -> None:
        from taxonet.serve.metrics import IngressMetrics

        self._classifier = classifier
        self._settings = IngressSettings.model_validate(settings)
        self._token = self._settings.token()
        self._metrics = IngressMetrics()
        self._preprocessor: Preprocessor | None = None
        self._preprocessor_lock = asyncio.Lock()
        self._review: ReviewQueueWriter | None = None
        if self._settings.review_queue is not None:
            self._review = ReviewQueueWriter(self._settings.review_queue, on_queued=self._metrics.review_queued,
                                             on_dropped=self._metrics.review_dropped).start()

    def __del__(self) -> None:
        if getattr(self, "_review", None) is not None:
            self._review.close()  # write the crops still waiting

    def __serve_build_asgi_app__(self) -> Any:
        return self.build_api()

    # ------------------------------------------------------------------ the FastAPI app
    def build_api(self) -> Any:
        api = FastAPI(
            title="taxonet",
            version="1",
            description="Hierarchical insect classification (order → family → species) with the lowest reliable "
                        "rank per image. Errors are JSON `{\"error\": {\"code\", \"message\"}}`.",
        )
        install_error_handlers(api)
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self._authenticate)], responses={401: ERROR_RESPONSES[401]})

        @v1.post("/classify", summary="Classify one image (raw body) or several (multipart `files`)",
                 responses={200: {"model": ClassifyResponse}, **ERROR_RESPONSES}, openapi_extra=_CLASSIFY_BODY)
        async def classify(request: Request) -> JSONResponse:
            return JSONResponse(await self._classify(request))

        @v1.get("/taxonomy", summary="Ranks, class names per rank and the tree")
        async def taxonomy() -> JSONResponse:
            return JSONResponse(await self._call_model("taxonomy"))

        @v1.get("/model", summary="The served model: name, version, checkpoint, transform, batching")
        async def model() -> JSONResponse:
            return JSONResponse(await self._call_model("describe"))

        api.include_router(v1)

        @api.get("/healthz", summary="Liveness: the ingress answers and the model deployment is reachable")
        async def healthz() -> JSONResponse:
            info = await self._call_model("describe")
            return JSONResponse({"status": "ok", "model": {"name": info["name"], "version": info["version"]}})

        api.add_middleware(_RequestMetrics, metrics=self._metrics)
        return api

    async def _authenticate(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer TOKEN'",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self._token.encode()):
            raise ApiError(401, "unauthorized", "wrong token",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    # ------------------------------------------------------------------ classify
    async def _classify(self, request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type in RAW_TYPES:
            body = await self._read_body(request, self._settings.max_image_bytes, "image")
            if not body:
                raise ApiError(400, "empty_body", "the request body is empty: send the image bytes")
            uploads = [(None, body)]
        elif media_type == "multipart/form-data":
            uploads = await self._read_multipart(request)
        else:
            shown = media_type or "none"
            raise ApiError(415, "unsupported_media_type", f"content type {shown} is not accepted: send one image as "
                           "image/jpeg, image/png or image/webp, or several as multipart/form-data 'files'")
        preprocessor = await self._current_preprocessor()
        # every image is decoded (and so validated) before any reaches the model; a bad one fails the request with
        # the first bad file named, deterministically
        images = await asyncio.gather(*(self._preprocess(preprocessor, data, self._where(index, name, len(uploads)))
                                        for index, (name, data) in enumerate(uploads)), return_exceptions=True)
        for image in images:
            if isinstance(image, BaseException):
                raise image
        answers = await self._infer([data for _, data in uploads], images, preprocessor.key)
        model = answers[0].pop("model")
        for answer in answers[1:]:
            answer.pop("model")
        predictions = [{"filename": name, **answer} for (name, _), answer in zip(uploads, answers, strict=True)]
        if self._review is not None:  # non-blocking: a full review queue drops and counts
            source = request.headers.get(SOURCE_HEADER)
            for (_, data), answer in zip(uploads, answers, strict=True):
                self._review.offer(data, answer, model, source)
        return {"model": model, "predictions": predictions}

    @staticmethod
    def _where(index: int, filename: str | None, count: int) -> str:
        return f"files[{index}] ({filename}): " if count > 1 or filename else ""

    async def _infer(self, blobs: list[bytes], images: list[np.ndarray], transform_key: str) -> list[dict[str, Any]]:
        """The answers for one request's images: one classifier call for all of them (see ``classify_many``)."""
        try:
            answers = await self._classifier.classify_many.remote(np.stack(images), transform_key)
            stale = [index for index, answer in enumerate(answers) if answer.get(STALE)]
            if stale:
                # A rollout changed the preprocessing after these images were prepared: the classifier prepares them
                # itself (it knows its own transform), and later requests use the new transform.
                await self._current_preprocessor(stale_key=transform_key)
                redone = await asyncio.gather(*(self._classifier.classify_bytes.remote(blobs[index])
                                                for index in stale))
                for index, answer in zip(stale, redone, strict=True):
                    answers[index] = answer
        except (RayActorError, ActorUnavailableError) as exc:  # replica gone or starting: not the client's fault
            log.warning("taxonet: classifier replica unavailable: %r", exc)
            raise ApiError(503, "unavailable", "the model deployment is not available; retry shortly") from None
        return answers

    async def _preprocess(self, preprocessor: Preprocessor, data: bytes, where: str) -> np.ndarray:
        start = time.perf_counter()
        try:
            # PIL releases the GIL: decode off the event loop. uint8 pixels (a quarter of the float tensor's bytes)
            # travel to the classifier, which normalises whole batches.
            tensor = await asyncio.to_thread(preprocessor.decode_uint8, data)
        except ImageDecodeError as exc:
            raise ApiError.from_decode(exc, where) from None
        self._metrics.stage("decode", time.perf_counter() - start)
        return tensor.numpy()

    async def _current_preprocessor(self, stale_key: str | None = None) -> Preprocessor:
        """The preprocessing of the served checkpoint; fetched once, and again when ``stale_key`` went out of date."""
        async with self._preprocessor_lock:
            current = self._preprocessor
            if current is None or (stale_key is not None and current.key == stale_key):
                info = await self._call_model("describe")
                spec = TransformSpec.from_dict(info["transform"])
                if current is None or current.key != spec_key(spec):
                    self._preprocessor = Preprocessor(spec, max_pixels=self._settings.max_image_pixels,
                                                      allowed_formats=SERVED_FORMATS)
            return self._preprocessor

    async def _call_model(self, method: str) -> Any:
        try:
            return await getattr(self._classifier, method).remote()
        except Exception as exc:  # the model deployment is starting, failing or gone: not the client's fault
            log.warning("taxonet: model deployment unreachable: %r", exc)
            raise ApiError(503, "unavailable", "the model deployment is not available; retry shortly") from None

    async def _read_body(self, request: Request, limit: int, what: str) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed ``limit`` (header or streamed bytes)."""
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise ApiError(400, "bad_request", f"invalid Content-Length {declared!r}") from None
            if declared_bytes > limit:
                raise ApiError(413, "payload_too_large", f"{what} of {declared_bytes} bytes is over the limit of "
                                                         f"{limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", f"{what} is over the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # starlette's own cache: lets request.form() parse what was already read
        return body

    async def _read_multipart(self, request: Request) -> list[tuple[str | None, bytes]]:
        settings = self._settings
        await self._read_body(request, settings.max_request_bytes, "request body")
        try:
            form = await request.form(max_files=settings.max_files, max_fields=settings.max_files + 16,
                                      max_part_size=settings.max_image_bytes)
        except (MultiPartException, StarletteHTTPException) as exc:  # starlette turns parser errors into 400s
            message = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
            if message.startswith("Too many files"):
                raise ApiError(400, "too_many_files",
                               f"too many files: at most {settings.max_files} per request") from None
            if message.startswith(("Part exceeded", "Field exceeded")):
                raise ApiError(413, "payload_too_large",
                               f"a form field is over the limit of {settings.max_image_bytes} bytes") from None
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {message}") from None
        try:
            parts = form.getlist("files")
            if not parts:
                fields = sorted(set(form.keys()))
                raise ApiError(400, "no_files", "the multipart body has no 'files' part"
                               + (f" (found {', '.join(fields)})" if fields else ""))
            if len(parts) > settings.max_files:
                raise ApiError(400, "too_many_files",
                               f"too many files ({len(parts)}): at most {settings.max_files} per request")
            uploads = []
            for index, part in enumerate(parts):
                if not isinstance(part, UploadFile):
                    raise ApiError(400, "bad_multipart", f"files[{index}] is a text field, not a file upload")
                part_type = (part.content_type or "").split(";", 1)[0].strip().lower()
                if part_type not in PART_TYPES:
                    raise ApiError(415, "unsupported_media_type",
                                   f"files[{index}] ({part.filename}) has content type {part_type}: send image/jpeg, "
                                   "image/png or image/webp")
                if part.size is not None and part.size > settings.max_image_bytes:
                    raise ApiError(413, "payload_too_large", f"files[{index}] ({part.filename}) has {part.size} "
                                                             f"bytes, over the limit of {settings.max_image_bytes}")
                data = await part.read()
                if not data:
                    raise ApiError(400, "empty_body", f"files[{index}] ({part.filename}) is empty")
                uploads.append((part.filename, data))
            return uploads
        finally:
            await form.close()


# ---------------------------------------------------------------------------------------------------- builder
def app_builder(args: "ServeArgs | dict[str, Any]") -> serve.Application:
    """Build the application from :class:`ServeArgs` (a Serve config's ``args:``); only ``checkpoint`` is required.

    The classifier gets the checkpoint and batching through ``user_config``, so a Serve config that changes only
    ``deployments[TaxonetClassifier].user_config`` rolls a new model out in place.
    """
    config = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    user_config = config.classifier_config().model_dump()
    classifier = TaxonetClassifier.options(user_config=user_config, **config.classifier.options()).bind(
        device=config.device, defaults=user_config, graph=config.graph)
    return TaxonetIngress.options(**config.ingress.options()).bind(classifier, config.ingress_settings())


__all__ = ["TaxonetClassifier", "TaxonetIngress", "app_builder", "error_response"]
