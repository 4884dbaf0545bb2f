"""The Ray Serve application: a CPU ingress (HTTP, validation, decoding) and a batched model deployment.

    client ──HTTP──▶ TaxonetIngress (FastAPI)        ──handle──▶ TaxonetClassifier (@serve.batch)
                     auth, admission, header checks,          Predictor: (JPEG decode on the GPU,) batch
                     decode + eval transform one at a time    forward, anomaly test, top-k per rank, metrics

Import path for ``serve run`` / ``serve deploy`` / the RayService: ``taxonet.serve.app:app_builder`` with the
arguments of :class:`taxonet.serve.config.ServeArgs`. The classifier follows a model reference — a checkpoint URI
or a registry alias ``MODELS/NAME@ALIAS`` — polled every ``model_poll_s`` (:mod:`taxonet.serve.follower`): a new
version is verified, loaded beside the running model and swapped in between batches, each request answered wholly by
the model live when it arrived; a version that fails is refused and the old one stays. Until a model is loaded the
app runs: ``/healthz`` 200, ``/readyz`` and ``/v1/classify`` 503 with ``Retry-After``. The classifier's
``user_config`` (:class:`ClassifierConfig`) is applied in place by ``reconfigure`` under the same rules: batching
changes at once, a new reference is followed, so a rollout fails no request.

The ingress preprocesses with the transform the classifier reports (from the checkpoint) and sends its key with the
pixels; if a rollout changed the transform meanwhile, the classifier refuses them (:class:`StaleTransformError`) and
the ingress prepares the request again with the new transform. HTTP parsing, auth and the load limits live in
:mod:`taxonet.serve.http`; the answers are the dataclasses of :mod:`taxonet.serve.predictor`.

With a review queue (``review_queue`` in the args) the ingress asks the classifier for each image's embedding too
(``classify_many(..., embed=True)``: pooled features from the same forward pass, at most 128 float16 dimensions) and
hands it to :class:`taxonet.review.queue.ReviewQueueWriter` with the crop; answers to clients never carry it.
"""

# No `from __future__ import annotations`: the deployment classes are pickled by value, and FastAPI must resolve
# endpoint annotations (Request, ...) from real objects, not strings whose globals did not travel.
import asyncio
import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from taxonet.auth import load_tokens
from taxonet.data.transforms import ImageDecodeError, TransformSpec, normalize_uint8
from taxonet.registry import ResolvedModel
from taxonet.review.queue import ReviewQueueWriter
from taxonet.serve.config import (DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, MODEL_POLL_S, TOKEN_ENV,
                                  TOKEN_FILE_ENV, ClassifierConfig, IngressSettings, ServeArgs)
from taxonet.serve.errors import ERROR_RESPONSES, ApiError, install_error_handlers
from taxonet.serve.follower import ModelFollower, ModelNotReady
from taxonet.serve.http import (Admission, BearerAuth, PixelBudget, RequestMetrics, Upload, check_images,
                                read_uploads, where)
from taxonet.serve.metrics import ClassifierMetrics, IngressMetrics
from taxonet.serve.predictor import (SERVED_FORMATS, BatchPrediction, ClassifyResponse, ImageAnswer, ModelRef,
                                     Predictor, Preprocessor, sniff_format, spec_key)

log = logging.getLogger("ray.serve")

#: optional client-supplied source id (camera, site) stored with crops queued for review
SOURCE_HEADER = "x-taxonet-source"
#: a request whose transform went stale is prepared again at most this many times (rollouts are minutes apart)
STALE_RETRIES = 3
#: how long a new classifier replica whose reference was refused waits for a running one to say what it serves
PEER_TIMEOUT_S = 10.0


class StaleTransformError(RuntimeError):
    """The pixels were prepared with another transform than the one of the model now served."""


@dataclasses.dataclass(frozen=True)
class Classified:
    """What :meth:`TaxonetClassifier.classify_many` returns to the ingress: the client's response and, when asked
    for (the review queue is on), one embedding per image (float16 [D], unit norm; None where the model gives none).
    Only ``response`` ever reaches a client."""

    response: ClassifyResponse
    embeddings: list[np.ndarray | None] | None = None


#: one image of a request inside the classifier's batcher: pixels or JPEG bytes, their transform key, embed or not
BatchItem = tuple[np.ndarray | bytes, str, bool]
#: what the batcher gives back per image: the model that answered, the answer, the embedding if asked for
BatchResult = tuple[ModelRef, ImageAnswer, np.ndarray | None]


# ---------------------------------------------------------------------------------------------------- model side
@serve.deployment(name="TaxonetClassifier")
class TaxonetClassifier:
    """Holds a :class:`Predictor`; answers one request's images per call, batched image by image across callers
    by ``@serve.batch``. On CPU the model runs as a frozen TorchScript graph unless ``graph`` is False.

    The model follows a reference (:class:`taxonet.serve.follower.ModelFollower`): polled every ``model_poll_s``,
    a new version is verified and loaded beside the old one and swapped in between batches; each request keeps the
    predictor that was live when it arrived. Until a model is loaded the replica runs and says it is not ready.
    """

    def __init__(self, device: str, defaults: dict[str, Any], graph: bool, jpeg_decode: str) -> None:
        self._device = device
        self._graph = graph
        self._jpeg_decode = jpeg_decode
        self._defaults = dict(defaults)
        self._config: ClassifierConfig | None = None
        self._predictor: Predictor | None = None
        self._follower: ModelFollower[Predictor] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._rollout_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._metrics = ClassifierMetrics()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batching settings at once; follow the (possibly new) model reference.

        Never fails for a model that cannot be loaded (the replica keeps what it had, or waits, and says so in
        GET /v1/model): a refused rollout must not become a config that later replicas cannot start with. Invalid
        settings are refused the same way once the replica runs; on a fresh replica they fall back to the
        application's arguments.
        """
        try:
            config = ClassifierConfig.layered(self._defaults, user_config)
        except ValueError as exc:
            self._rollout_error = f"user_config refused: {exc}"
            log.error("taxonet: %s", self._rollout_error)
            if self._config is not None:
                return
            config = ClassifierConfig.layered(self._defaults, None)
        else:
            self._rollout_error = None
        self._predict_batch.set_max_batch_size(config.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._metrics.label_series_per_rank = config.label_series_per_rank
        async with self._reload_lock:
            self._config = config
            if self._predictor is not None:
                self._predictor.top_k = config.top_k
            if self._follower is None:
                self._follower = ModelFollower(config.model, self._load)
                await self._poll()
                args_model = self._defaults.get("model")
                if self._predictor is None and self._follower.refused and args_model != config.model:
                    # a new replica (scale-up, restart) whose recorded user_config reference was refused: serve what
                    # the running replicas serve if one answers, else the application's own reference (args)
                    self._follower.fallback = await self._peer_model() or args_model
                    await self._poll()
            elif self._follower.reference != config.model:
                self._follower.follow(config.model)
                await self._poll()
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _peer_model(self) -> str | None:
        """The checkpoint another running replica of this deployment serves (None if none answers in time)."""
        context = serve.get_replica_context()
        try:
            handle = serve.get_deployment_handle(context.deployment, context.app_name)
            info = await asyncio.wait_for(handle.describe.remote(), timeout=PEER_TIMEOUT_S)
        except Exception as exc:  # no running peer (a fresh deploy), or it is busy: the args are the fallback
            log.info("taxonet: no running replica told its model (%r)", exc)
            return None
        live = info.get("live") or {}
        return live.get("uri")

    def _load(self, resolved: ResolvedModel) -> Predictor:
        config = self._config
        assert config is not None
        predictor = Predictor.from_checkpoint(resolved.uri, self._device, top_k=config.top_k, graph=self._graph)
        # a registry version's answers name the model and version number the registry gave it
        predictor.info.update(name=resolved.name, version=resolved.version, model_reference=resolved.reference)
        return predictor

    async def _poll(self) -> None:
        """One poll of the reference (in a thread: it reads storage and may load a model); swap in a new model."""
        follower = self._follower
        assert follower is not None
        result = await asyncio.to_thread(follower.poll)
        if result.served is not None:
            predictor = result.served.model
            self._predictor = predictor  # atomic: each request pinned the predictor it started with
            self._metrics.serving(predictor.name, predictor.version)
            log.info("taxonet: serving %s %s from %s on %s", predictor.name, predictor.version,
                     result.served.resolved.uri, predictor.device)
        if result.is_failure:
            self._metrics.load_failed()

    async def _poll_forever(self) -> None:
        while True:
            config = self._config
            await asyncio.sleep(config.model_poll_s if config else MODEL_POLL_S)
            try:
                async with self._reload_lock:
                    await self._poll()
            except Exception:  # never let one bad poll stop the following
                log.exception("taxonet: polling the model reference failed")

    def check_health(self) -> None:
        if self._poller is not None and self._poller.done():
            raise RuntimeError("the model poller stopped")

    def describe(self) -> dict[str, Any]:
        """GET /v1/model: the live model (if any), the followed reference and the last attempt's outcome."""
        follower = self._follower
        info: dict[str, Any] = {"name": None, "version": None, "checkpoint": None, "transform": None}
        if self._predictor is not None:
            info.update(self._predictor.describe())
        if follower is not None:
            info.update(follower.status())
        info["ready"] = self._predictor is not None
        info["replica"] = serve.get_replica_context().replica_id.unique_id
        config = self._config
        info["max_batch_size"] = config.max_batch_size if config else None
        info["batch_wait_timeout_s"] = config.batch_wait_timeout_s if config else None
        info["model_poll_s"] = config.model_poll_s if config else None
        info["rollout_error"] = self._rollout_error or (follower.last_error if follower else None)
        info["jpeg_on_device"] = self._jpeg_on_device()
        return info

    def _jpeg_on_device(self) -> bool:
        """Whether the ingress should send JPEGs as bytes, for ``preprocess_jpeg_on_device`` here."""
        if self._jpeg_decode == "auto":
            return self._predictor is not None and self._predictor.device.type == "cuda"
        return self._jpeg_decode == "model"

    def taxonomy(self) -> dict[str, Any]:
        taxonomy = self._require().taxonomy
        return {"ranks": list(taxonomy.ranks),
                "classes": {rank: list(names) for rank, names in zip(taxonomy.ranks, taxonomy.names)},
                "tree": taxonomy.tree()}

    async def classify_many(self, images: np.ndarray | list[np.ndarray | bytes], transform_key: str,
                            embed: bool = False) -> Classified:
        """One request's images → its answers in order (and, with ``embed``, their embeddings from the same forward
        pass). Each image is resized uint8 pixels [3, S, S] prepared by the ingress with the transform
        ``transform_key``, or (``jpeg_on_device``) a JPEG's bytes, decoded here. :class:`StaleTransformError` when
        pixels were prepared with another transform than the served model's.

        One call per HTTP request, however many images it carries: Ray and Serve's per-call work (routing, the
        queue-length probe, (de)serialisation, metrics) runs in this replica's process and shares its GIL with the
        forward pass. The images still batch one by one with other requests' images in ``_predict_batch``.
        """
        predictor = self._require()  # the whole request is answered by the model live now
        results = await asyncio.gather(*(self._predict_batch((predictor, (image, transform_key, embed)))
                                         for image in images))
        if any(result is None for result in results):
            raise StaleTransformError("the served model's transform changed while the request was prepared")
        if any(model != results[0][0] for model, _, _ in results):  # never, by construction: fail rather than mix
            raise RuntimeError("one request was answered by two model versions")
        response = ClassifyResponse(model=results[0][0], predictions=[answer for _, answer, _ in results])
        return Classified(response, [embedding for _, _, embedding in results] if embed else None)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _predict_batch(self, items: list[tuple[Predictor, BatchItem]]) -> list[BatchResult | None]:
        # each item carries the predictor its request pinned: a batch formed across a swap runs once per model
        groups: dict[int, tuple[Predictor, list[int]]] = {}
        for index, (predictor, _) in enumerate(items):
            groups.setdefault(id(predictor), (predictor, []))[1].append(index)
        out: list[BatchResult | None] = [None] * len(items)
        for predictor, indices in groups.values():
            answers = await self._predict_with(predictor, [items[i][1] for i in indices])
            for index, answer in zip(indices, answers, strict=True):
                out[index] = answer
        return out

    async def _predict_with(self, predictor: Predictor, items: list[BatchItem]) -> list[BatchResult | None]:
        key = spec_key(predictor.transform)
        # JPEG bytes are prepared here, with this model's transform: never stale
        fresh = [i for i, (item, item_key, _) in enumerate(items) if isinstance(item, bytes) or item_key == key]
        out: list[BatchResult | None] = [None] * len(items)
        if fresh:
            images = [items[i][0] for i in fresh]
            # the whole batch's features come from its one forward pass; only the images asked for get them
            embed = any(items[i][2] for i in fresh)
            start = time.perf_counter()
            if predictor.device.type == "cuda":
                # kernels run asynchronously and the wait for them releases the GIL: a worker thread keeps the
                # replica's event loop taking requests (the next batch fills while this one runs)
                prediction = await asyncio.to_thread(self._predict, predictor, images, embed)
            else:
                # On CPU the forward pass holds a core and, in Python between ops, the GIL: from a worker thread it
                # starved the event loop, so requests trickled in and batches stayed at ~1 image (ResNet50-MTL,
                # 2 cores: 14 img/s). Inline, requests queue up during the pass and the next batch takes them all.
                prediction = self._predict(predictor, images, embed)
            self._metrics.batch(len(fresh), time.perf_counter() - start, prediction.answers)
            model = predictor.model_ref
            embeddings = prediction.embeddings
            for row, (i, answer) in enumerate(zip(fresh, prediction.answers, strict=True)):
                wanted = embeddings is not None and items[i][2]
                out[i] = (model, answer, embeddings[row].copy() if wanted else None)
        return out

    @staticmethod
    def _predict(predictor: Predictor, images: list[np.ndarray | bytes], embed: bool) -> BatchPrediction:
        """Answers (and, with ``embed``, embeddings) for a batch of pixels (normalised on the device) and JPEG bytes
        (decoded on the device)."""
        jpegs = [index for index, image in enumerate(images) if isinstance(image, bytes)]
        if not jpegs:
            return predictor.predict_batch(torch.from_numpy(np.stack(images)), embed=embed)
        size = predictor.transform.input_size
        batch = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=predictor.device)
        batch[jpegs] = predictor.preprocess_jpeg_on_device([images[index] for index in jpegs])
        pixels = [index for index, image in enumerate(images) if not isinstance(image, bytes)]
        if pixels:
            stacked = torch.from_numpy(np.stack([images[index] for index in pixels])).to(predictor.device)
            batch[pixels] = normalize_uint8(stacked, predictor.transform)
        return predictor.predict_batch(batch, embed=embed)

    def _require(self) -> Predictor:
        if self._predictor is None:
            follower = self._follower
            reason = follower.last_error if follower is not None and follower.last_error else "not loaded yet"
            raise ModelNotReady(f"no model loaded yet: {reason}")
        return self._predictor


# ---------------------------------------------------------------------------------------------------- HTTP side
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


@serve.deployment(name="TaxonetIngress")
@serve.ingress()
class TaxonetIngress:
    """HTTP front: authenticates, admits, validates, decodes and preprocesses; the classifier does the model work.

    Memory holds by construction (docs/api.md gives the formula): at most ``max_concurrent_requests`` requests
    inside, each body held once, and images decoded one at a time per request within the replica's
    ``decode_pixel_budget``.
    """

    def __init__(self, classifier: DeploymentHandle, settings: dict[str, Any]) -> None:
        self._classifier = classifier
        self._settings = IngressSettings.model_validate(settings)
        self._auth = BearerAuth(load_tokens())
        if self._auth.open:
            log.warning("taxonet: NO API TOKEN configured (%s / %s unset or empty): /v1/* answers anyone who can "
                        "reach this port", TOKEN_ENV, TOKEN_FILE_ENV)
        self._admission = Admission(self._settings.max_concurrent_requests, self._settings.retry_after_s)
        self._decode_budget = PixelBudget(self._settings.decode_pixel_budget)
        self._metrics = IngressMetrics()
        self._preprocessor: Preprocessor | None = None
        self._jpeg_on_device = False
        self._preprocessor_lock = asyncio.Lock()
        #: the classifier's poll interval as last reported (the Retry-After of model_not_ready)
        self._poll_s = MODEL_POLL_S
        self._review: ReviewQueueWriter | None = None
        if self._settings.review_queue is not None:
            self._review = ReviewQueueWriter(self._settings.review_queue, on_queued=self._metrics.review_queued,
                                             on_dropped=self._metrics.review_dropped).start()

    def __del__(self) -> None:
        if getattr(self, "_review", None) is not None:
            self._review.close()  # write the crops still waiting

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.build_api()

    # ------------------------------------------------------------------ the FastAPI app
    def build_api(self) -> FastAPI:
        api = FastAPI(
            title="taxonet",
            version="1",
            description="Hierarchical insect classification (order → family → species) with the lowest reliable "
                        "rank per image. Errors are JSON `{\"error\": {\"code\", \"message\"}}`.",
        )
        install_error_handlers(api)
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self._authenticate)], responses={401: ERROR_RESPONSES[401]})

        @v1.post("/classify", summary="Classify one image (raw body) or several (multipart `files`)",
                 response_model=ClassifyResponse, responses=ERROR_RESPONSES, openapi_extra=_CLASSIFY_BODY)
        async def classify(request: Request) -> ClassifyResponse:
            return await self._classify(request)

        @v1.get("/taxonomy", summary="Ranks, class names per rank and the tree")
        async def taxonomy() -> dict[str, Any]:
            return await self._ask(self._classifier.taxonomy.remote())

        @v1.get("/model", summary="The served model: name, version, checkpoint, transform, batching")
        async def model() -> dict[str, Any]:
            return await self._ask(self._classifier.describe.remote())

        api.include_router(v1)

        @api.get("/healthz", summary="Liveness: the ingress answers and the model deployment is reachable (also "
                                     "while no model is loaded yet)")
        async def healthz() -> dict[str, Any]:
            info = await self._ask(self._classifier.describe.remote())
            return {"status": "ok", "model": {"name": info["name"], "version": info["version"]}}

        @api.get("/readyz", summary="Readiness: a model is loaded (503 with Retry-After until then)",
                 responses={503: ERROR_RESPONSES[503]})
        async def readyz() -> dict[str, Any]:
            info = await self._ask(self._classifier.describe.remote())
            if not info.get("ready"):
                raise self._not_ready(info.get("last_error") or "not loaded yet", info.get("model_poll_s"))
            return {"status": "ready", "model": {"name": info["name"], "version": info["version"]}}

        api.add_middleware(RequestMetrics, metrics=self._metrics)
        return api

    async def _authenticate(self, request: Request) -> None:
        self._auth.check(request.headers.get("authorization"))

    # ------------------------------------------------------------------ classify
    async def _classify(self, request: Request) -> ClassifyResponse:
        async with self._admission.slot():
            uploads = await read_uploads(request, self._settings)
            for _ in range(STALE_RETRIES):
                preprocessor = await self._current_preprocessor()
                pixels = await self._prepare(preprocessor, uploads)
                try:
                    # embeddings only feed the review queue: asked for only when it is on
                    classified: Classified = await self._ask(self._classifier.classify_many.remote(
                        pixels, preprocessor.key, self._review is not None))
                except StaleTransformError:
                    # a rollout changed the preprocessing after these images were prepared: fetch the new transform
                    # and prepare them again (rare: once per rollout, for the requests in flight)
                    await self._current_preprocessor(stale_key=preprocessor.key)
                    continue
                response = classified.response
                predictions = [dataclasses.replace(answer, filename=upload.filename)
                               for upload, answer in zip(uploads, response.predictions, strict=True)]
                if self._review is not None:  # non-blocking: a full review queue drops and counts
                    source = request.headers.get(SOURCE_HEADER)
                    embeddings = classified.embeddings or [None] * len(uploads)
                    for upload, answer, embedding in zip(uploads, predictions, embeddings, strict=True):
                        self._review.offer(upload.data, answer, response.model, source, embedding)
                return dataclasses.replace(response, predictions=predictions)
        raise ApiError(503, "unavailable", "the model's preprocessing kept changing during this request; retry",
                       headers={"Retry-After": str(self._settings.retry_after_s)})

    async def _prepare(self, preprocessor: Preprocessor,
                       uploads: list[Upload]) -> np.ndarray | list[np.ndarray | bytes]:
        """Every image's header is checked (format, pixels, the request's summed pixels) before any is decoded; then
        they are decoded one at a time within the replica's pixel budget: resized uint8 [N, 3, S, S]. Where the model
        decodes JPEGs on its device (``jpeg_on_device``), a JPEG goes as its bytes instead."""
        pixels = check_images(preprocessor, uploads, self._settings.max_request_pixels)
        size = preprocessor.spec.input_size
        out = np.empty((len(uploads), 3, size, size), dtype=np.uint8)
        jpegs: dict[int, bytes] = {}
        for index, (upload, count) in enumerate(zip(uploads, pixels, strict=True)):
            if self._jpeg_on_device and sniff_format(upload.data) == "JPEG":
                jpegs[index] = upload.data
                continue
            start = time.perf_counter()
            try:
                async with self._decode_budget.hold(count):
                    # PIL releases the GIL: decode off the event loop
                    out[index] = (await asyncio.to_thread(preprocessor.decode_uint8, upload.data)).numpy()
            except ImageDecodeError as exc:
                raise ApiError.from_decode(exc, where(index, upload, len(uploads))) from None
            self._metrics.stage("decode", time.perf_counter() - start)
        if not jpegs:
            return out
        return [jpegs.get(index, out[index]) for index in range(len(uploads))]

    async def _current_preprocessor(self, stale_key: str | None = None) -> Preprocessor:
        """The preprocessing of the served checkpoint; fetched once, and again when ``stale_key`` went out of date."""
        async with self._preprocessor_lock:
            current = self._preprocessor
            if current is None or (stale_key is not None and current.key == stale_key):
                info = await self._ask(self._classifier.describe.remote())
                if not info.get("transform"):
                    raise self._not_ready(info.get("last_error") or "not loaded yet", info.get("model_poll_s"))
                self._jpeg_on_device = bool(info.get("jpeg_on_device"))
                spec = TransformSpec.from_dict(info["transform"])
                if current is None or current.key != spec_key(spec):
                    self._preprocessor = Preprocessor(spec, max_pixels=self._settings.max_image_pixels,
                                                      allowed_formats=SERVED_FORMATS)
            assert self._preprocessor is not None
            return self._preprocessor

    def _not_ready(self, reason: str, poll_s: float | None) -> ApiError:
        """503 ``model_not_ready``; Retry-After is the classifier's poll interval (a model can appear per poll)."""
        if poll_s:
            self._poll_s = poll_s
        reason = reason.removeprefix("no model loaded yet: ")
        return ApiError(503, "model_not_ready", f"no model loaded yet ({reason}); retry later",
                        headers={"Retry-After": str(max(1, math.ceil(self._poll_s)))})

    async def _ask(self, response: DeploymentResponse) -> Any:
        """A model deployment call's result within ``classifier_timeout_s``: 504 when it takes longer, 503 when the
        deployment is starting, failing or gone (not the client's fault either way)."""
        timeout = self._settings.classifier_timeout_s
        try:
            return await asyncio.wait_for(response, timeout=timeout)
        except StaleTransformError:
            raise
        except ModelNotReady as exc:  # this classifier replica has no model yet (e.g. just scaled up)
            raise self._not_ready(str(exc), self._poll_s) from None
        except asyncio.TimeoutError:
            response.cancel()
            log.warning("taxonet: the model deployment did not answer within %g s", timeout)
            raise ApiError(504, "timeout", f"the model deployment did not answer within {timeout:g} s") from None
        except (RayActorError, ActorUnavailableError) as exc:  # replica gone or starting
            log.warning("taxonet: classifier replica unavailable: %r", exc)
            raise ApiError(503, "unavailable", "the model deployment is not available; retry shortly",
                           headers={"Retry-After": str(self._settings.retry_after_s)}) from None
        except Exception as exc:
            log.warning("taxonet: model deployment call failed: %r", exc)
            raise ApiError(503, "unavailable", "the model deployment is not available; retry shortly",
                           headers={"Retry-After": str(self._settings.retry_after_s)}) from None


# ---------------------------------------------------------------------------------------------------- builder
def app_builder(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """Build the application from :class:`ServeArgs` (a Serve config's ``args:``); only ``model`` is required.

    The classifier gets the model reference, its poll interval and batching through ``user_config``, so a Serve
    config that changes only ``deployments[TaxonetClassifier].user_config`` rolls a new model out in place; the
    args' own reference is what a new replica falls back to when a rolled-out one is refused and no peer answers.
    """
    config = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    user_config = config.classifier_config().model_dump()
    classifier = TaxonetClassifier.options(user_config=user_config, **config.classifier_options()).bind(
        device=config.device, defaults=user_config, graph=config.graph, jpeg_decode=config.jpeg_decode)
    return TaxonetIngress.options(**config.ingress_options()).bind(classifier,
                                                                   config.ingress_settings().model_dump())


__all__ = ["Classified", "StaleTransformError", "TaxonetClassifier", "TaxonetIngress", "app_builder"]
