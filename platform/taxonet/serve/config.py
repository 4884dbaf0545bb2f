"""Typed arguments of the Serve application (the ``args:`` of a Serve config, or the dict given to ``app_builder``).

Pydantic lives here because this is the configuration boundary: ``serve run``/``serve deploy`` hand a YAML mapping to
:func:`taxonet.serve.app.app_builder`, and a typo or a bad value must fail the deploy with a message naming the field.

One object per concern, each default stated once: :class:`ClassifierConfig` (the model deployment's ``user_config``),
:class:`IngressSettings` (request limits, memory budget, timeouts of the HTTP side) and :class:`DeploymentArgs`
(replica resources). :class:`ServeArgs` is both of the first two (it inherits their fields, so the Serve config's
``args`` stay one flat mapping) plus the device and the two deployments' resources.

The API token is never an argument: it would sit in plain text in the Serve config and the RayService. The ingress
reads it from ``TAXONET_API_TOKEN`` or from the file named by ``TAXONET_API_TOKEN_FILE`` (:mod:`taxonet.auth`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve.config import AutoscalingConfig

from taxonet.auth import TOKEN_ENV, TOKEN_FILE_ENV
from taxonet.data.transforms import DEFAULT_MAX_PIXELS
from taxonet.errors import CheckpointError, StorageError
from taxonet.registry import parse_reference
from taxonet.serve.predictor import DEFAULT_TOP_K

MIB = 1024 * 1024
#: images per model batch (``@serve.batch``), unless configured otherwise
DEFAULT_MAX_BATCH_SIZE = 32
#: seconds a batch waits to fill, unless configured otherwise
DEFAULT_BATCH_WAIT_S = 0.01
#: replica count bounds of the default autoscaling
DEFAULT_MAX_REPLICAS = 4
#: seconds a replica being replaced gets beyond its longest request's timeouts (decoding, answering)
DRAIN_MARGIN_S = 15.0
#: seconds between two polls of the model reference by each classifier replica (also the Retry-After of a 503
#: while no model is loaded)
MODEL_POLL_S = 30.0

_TOKEN_IN_ARGS = (f"api_token is not accepted in the Serve args: it would be stored in plain text in the Serve config "
                  f"and the RayService. Give the ingress replicas the token in the environment variable {TOKEN_ENV} "
                  f"(from a Kubernetes Secret), or mount it as a file and set {TOKEN_FILE_ENV} to its path; several "
                  f"tokens, comma-separated, are all accepted (rotation).")


def _check_reference(value: str) -> str:
    """A checkpoint URI or a registry reference, checked for form (a ``gs://`` URI or a bad alias fails here)."""
    try:
        parse_reference(value)
    except (CheckpointError, StorageError) as exc:
        raise ValueError(str(exc)) from None
    return value


def _model_or_checkpoint(data: Any) -> Any:
    """``checkpoint`` (the older name) is accepted for ``model``; exactly one of them."""
    if not isinstance(data, dict):
        return data
    if data.get("model") is None and data.get("checkpoint") is None:
        raise ValueError("model is required: a checkpoint URI or a registry reference MODELS/NAME@ALIAS "
                         "(checkpoint is accepted as its older name)")
    if "checkpoint" in data:
        data = dict(data)
        checkpoint = data.pop("checkpoint")
        if data.get("model") is not None and checkpoint is not None:
            raise ValueError("give either model or checkpoint (its older name), not both")
        if checkpoint is not None:
            data["model"] = checkpoint
    return data


class DeploymentArgs(BaseModel):
    """Replica resources and scaling of one deployment (a Serve config's ``deployments:`` entry still overrides)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    #: calls waiting for a replica beyond which Serve answers 503 at once (-1: no limit). The ingress's own
    #: ``max_concurrent_requests`` answers the JSON 503 first; this bounds what queues in front of it
    max_queued_requests: int = Field(256, ge=-1)
    #: fixed replica count, used only when ``autoscaling`` is null
    num_replicas: int = Field(1, ge=1)
    #: Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, ...)
    #: (the ingress's default target stays under its max_concurrent_requests, so it scales out before refusing)
    autoscaling: dict[str, Any] | None = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": DEFAULT_MAX_REPLICAS,
                                 "target_ongoing_requests": 4})
    #: Serve's access log line per call (the ingress's: one per HTTP request; the classifier's: one per call from
    #: the ingress, off by default — it repeats the ingress's and costs the model replica's GIL time under load)
    access_log: bool = True
    #: environment variables of this deployment's replicas (e.g. TAXONET_API_TOKEN_FILE=/var/run/secrets/token);
    #: never the token itself
    env_vars: dict[str, str] = Field(default_factory=dict)

    @field_validator("autoscaling")
    @classmethod
    def _validate_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Validate against Serve's own AutoscalingConfig, so a mistake fails at build time, not in the controller."""
        if value is None:
            return None
        AutoscalingConfig.model_validate(value)
        return dict(value)

    @field_validator("env_vars")
    @classmethod
    def _no_token_in_env_vars(cls, value: dict[str, str]) -> dict[str, str]:
        if TOKEN_ENV in value:
            raise ValueError(_TOKEN_IN_ARGS)
        return value

    def options(self, drain_s: float | None = None) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``; ``drain_s``: how long a replica being replaced (rollout,
        downscale) may finish its calls in flight before Serve kills it (Serve's default is 20 s)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.env_vars:
            actor["runtime_env"] = {"env_vars": dict(self.env_vars)}
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
            "logging_config": {"enable_access_log": self.access_log},
        }
        if drain_s is not None:
            options["graceful_shutdown_timeout_s"] = drain_s
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling
        else:
            options["num_replicas"] = self.num_replicas
        return options


def _default_classifier() -> DeploymentArgs:
    # the classifier's queue is bounded by the ingresses' admission (max_concurrent_requests per ingress replica)
    return DeploymentArgs(autoscaling={"min_replicas": 1, "max_replicas": DEFAULT_MAX_REPLICAS,
                                       "target_ongoing_requests": DEFAULT_MAX_BATCH_SIZE},
                          max_queued_requests=-1, access_log=False)


class ClassifierConfig(BaseModel):
    """What ``TaxonetClassifier`` takes through ``user_config`` (changed in place, without restarting replicas).

    A new ``model`` reference (or ``checkpoint``, its older name) is followed from then on: what it points at is
    verified and loaded beside the old model, which keeps answering until the new one is ready, or keeps answering
    if the new one is refused (:mod:`taxonet.serve.follower`).
    """

    model_config = ConfigDict(extra="forbid")

    #: what to serve: a checkpoint directory (local path, file:// or s3://; S3 settings from the environment) or a
    #: registry reference MODELS/NAME@ALIAS / MODELS/NAME@N. Followed: each classifier replica polls it every
    #: ``model_poll_s`` and loads what it points at when that changes (docs/models.md). ``checkpoint`` is accepted
    #: as its older name.
    model: str = Field(min_length=1)
    model_poll_s: float = Field(MODEL_POLL_S, gt=0)
    top_k: int = Field(DEFAULT_TOP_K, ge=1)
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_S, ge=0)
    #: ``taxonet_predictions`` series per rank: the first N labels a replica predicts get their own, the rest count
    #: as "other" (a real taxonomy has thousands of species: one series each would swamp Prometheus)
    label_series_per_rank: int = Field(20, ge=0)

    _accept_checkpoint = model_validator(mode="before")(_model_or_checkpoint)
    _check_model = field_validator("model")(_check_reference)

    @property
    def checkpoint(self) -> str:
        """The older name of ``model``."""
        return self.model

    @classmethod
    def layered(cls, defaults: dict[str, Any], user_config: dict[str, Any] | None) -> ClassifierConfig:
        """``user_config`` over the application's ``defaults``; a reference given there (as ``model`` or
        ``checkpoint``) replaces the defaults' ``model``."""
        user_config = dict(user_config or {})
        base = dict(defaults)
        if "checkpoint" in user_config or "model" in user_config:
            base.pop("model", None)
            base.pop("checkpoint", None)
        return cls.model_validate({**base, **user_config})


class ReviewQueueArgs(BaseModel):
    """Where and how the ingress queues crops for expert review (``review_queue:`` of the Serve args; absent = off).

    Every answer whose lowest reliable rank is above the deepest rank is queued ("unsure"), plus a random share
    ``audit_rate`` of the sure ones ("audit"). Queueing never slows or fails a request: the in-memory queue is
    bounded (items and bytes), a full queue drops the crop and counts it, and a background thread writes whole
    batches to ``uri`` (see :mod:`taxonet.review.queue`).
    """

    model_config = ConfigDict(extra="forbid")

    #: the review queue: local path, file:// or s3:// (batches go to URI/batches/)
    uri: str = Field(min_length=1)
    #: share of sure answers queued for auditing the model (0 = none)
    audit_rate: float = Field(0.01, ge=0.0, le=1.0)
    #: crops waiting in memory for the writer; beyond this (or max_memory_bytes) new crops are dropped and counted
    max_items: int = Field(256, ge=1)
    #: bytes waiting in memory: the request bodies (before re-encoding) plus their embeddings (≤ 256 bytes each)
    max_memory_bytes: int = Field(64 * MIB, ge=1)
    #: a batch is written when it holds this many crops ...
    batch_size: int = Field(64, ge=1)
    #: ... or when its oldest crop has waited this long
    flush_interval_s: float = Field(30.0, gt=0)
    #: longer side of the stored JPEG (never upscaled)
    max_side: int = Field(512, ge=16)
    #: most bytes of one stored JPEG (quality is lowered, then the side halved, until it fits)
    max_jpeg_bytes: int = Field(256 * 1024, ge=4096)
    jpeg_quality: int = Field(90, ge=10, le=100)


class IngressSettings(BaseModel):
    """The HTTP side's limits, memory budget and timeouts, per ingress replica (docs/api.md gives the worst-case
    memory of a replica as a formula of these)."""

    model_config = ConfigDict(extra="forbid")

    #: limit on one image's encoded size (a raw body, or one multipart file)
    max_image_bytes: int = Field(10 * MIB, ge=1)
    #: limit on a whole request body (multipart)
    max_request_bytes: int = Field(32 * MIB, ge=1)
    #: most images in one multipart request
    max_files: int = Field(32, ge=1)
    #: limit on one image's pixel count, read from its header: larger images are refused before decoding
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    #: limit on the summed pixel count of one request's images, checked from the headers before any is decoded
    max_request_pixels: int = Field(5 * DEFAULT_MAX_PIXELS, ge=1)
    #: pixels being decoded at once in one replica (summed over all its requests; a request decodes its images one
    #: at a time): the replica's decode memory is at most about 16 bytes × this (tests/bench/decode_memory.py)
    decode_pixel_budget: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    #: classify requests one ingress replica works on at once; more are answered 503 with Retry-After at once
    max_concurrent_requests: int = Field(8, ge=1)
    #: seconds a client may take to send its body; slower is answered 408
    body_timeout_s: float = Field(30.0, gt=0)
    #: seconds the ingress waits for the model deployment's answer; longer is answered 504
    classifier_timeout_s: float = Field(30.0, gt=0)
    #: the Retry-After header (seconds) of a 503 answered under overload
    retry_after_s: int = Field(1, ge=0)
    #: queue unsure answers (and an audit share of sure ones) for expert review; null = off
    review_queue: ReviewQueueArgs | None = None

    @model_validator(mode="after")
    def _check_budgets(self) -> IngressSettings:
        # an image at the per-image limit must fit the per-request and the decode budget, or it could never pass
        for name in ("max_request_pixels", "decode_pixel_budget"):
            if getattr(self, name) < self.max_image_pixels:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least max_image_pixels "
                                 f"({self.max_image_pixels})")
        return self


class ServeArgs(ClassifierConfig, IngressSettings):
    """Arguments of the taxonet Serve application: :class:`ClassifierConfig` and :class:`IngressSettings` (their
    fields, flat), the device and the deployments' resources; only ``model`` (or ``checkpoint``) is required."""

    model_config = ConfigDict(extra="forbid")

    #: "auto" (CUDA when the replica was given a GPU), "cpu", "cuda" or "cuda:N"
    device: str = "auto"
    #: on CPU, run the model as a frozen TorchScript graph (no GIL during the forward pass; checked against the
    #: eager model at load, which is kept if tracing fails); no effect on CUDA
    graph: bool = True
    #: where JPEGs are decoded: "ingress" (PIL, on the CPU), "model" (the classifier, with decode_jpeg on its device:
    #: nvjpeg on a GPU) or "auto" (the model when it runs on CUDA). PNG and WebP are always decoded by the ingress
    jpeg_decode: Literal["auto", "ingress", "model"] = "auto"
    ingress: DeploymentArgs = Field(default_factory=DeploymentArgs)
    classifier: DeploymentArgs = Field(default_factory=_default_classifier)

    @model_validator(mode="before")
    @classmethod
    def _refuse_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_token" in data:
            raise ValueError(_TOKEN_IN_ARGS)
        return data

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_queues(self) -> ServeArgs:
        # A replica never holds more than max_ongoing_requests calls, so a bigger batch could never fill.
        if self.classifier.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"classifier.max_ongoing_requests ({self.classifier.max_ongoing_requests}) must be at "
                             f"least max_batch_size ({self.max_batch_size})")
        # Serve must hand the ingress more requests than it admits, or Serve queues them and the JSON 503 never fires
        if self.ingress.max_ongoing_requests < self.max_concurrent_requests:
            raise ValueError(f"ingress.max_ongoing_requests ({self.ingress.max_ongoing_requests}) must be at least "
                             f"max_concurrent_requests ({self.max_concurrent_requests})")
        return self

    def ingress_options(self) -> dict[str, Any]:
        """The ingress's ``Deployment.options``. A replica being replaced finishes every request it holds: the
        longest takes the body timeout plus the model's answer timeout (plus decoding); Serve's default drain of
        20 s cut such requests off with a bare 500 during rollouts on a loaded machine."""
        return self.ingress.options(drain_s=self.body_timeout_s + self.classifier_timeout_s + DRAIN_MARGIN_S)

    def classifier_options(self) -> dict[str, Any]:
        """The classifier's ``Deployment.options``: a replica being replaced answers the calls it holds (each is
        waited for at most ``classifier_timeout_s`` by the ingress)."""
        return self.classifier.options(drain_s=self.classifier_timeout_s + DRAIN_MARGIN_S)

    def classifier_config(self) -> ClassifierConfig:
        return ClassifierConfig.model_validate(self.model_dump(include=set(ClassifierConfig.model_fields)))

    def ingress_settings(self) -> IngressSettings:
        return IngressSettings.model_validate(self.model_dump(include=set(IngressSettings.model_fields)))
