"""Typed arguments of the Serve application (the ``args:`` of a Serve config, or the dict given to ``app_builder``).

Pydantic lives here because this is the configuration boundary: ``serve run``/``serve deploy`` hand a YAML mapping to
:func:`taxonet.serve.app.app_builder`, and a typo or a bad value must fail the deploy with a message naming the field.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from taxonet.data.transforms import DEFAULT_MAX_PIXELS

#: environment variable read (in the ingress replica) when ``api_token`` is not given
TOKEN_ENV = "TAXONET_API_TOKEN"
MIB = 1024 * 1024


def _check_autoscaling(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate against Serve's own AutoscalingConfig, so a mistake fails at build time, not in the controller."""
    if value is None:
        return None
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig.model_validate(value)
    return dict(value)


class DeploymentArgs(BaseModel):
    """Replica resources and scaling of one deployment (a Serve config's ``deployments:`` entry still overrides)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    #: fixed replica count, used only when ``autoscaling`` is null
    num_replicas: int = Field(1, ge=1)
    #: Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, ...)
    autoscaling: dict[str, Any] | None = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16})
    #: Serve's access log line per call (the ingress's: one per HTTP request; the classifier's: one per call from
    #: the ingress, off by default — it repeats the ingress's and costs the model replica's GIL time under load)
    access_log: bool = True

    @field_validator("autoscaling")
    @classmethod
    def _validate_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_autoscaling(value)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "logging_config": {"enable_access_log": self.access_log},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling
        else:
            options["num_replicas"] = self.num_replicas
        return options


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
    #: encoded bytes waiting in memory (the request bodies, before re-encoding)
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


def _default_classifier() -> DeploymentArgs:
    return DeploymentArgs(autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32},
                          access_log=False)


class ClassifierConfig(BaseModel):
    """What ``TaxonetClassifier`` takes through ``user_config`` (changed in place, without restarting replicas).

    A new ``checkpoint`` is loaded beside the old model, which keeps answering until the new one is ready.
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(min_length=1)
    top_k: int = Field(3, ge=1)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    #: the ingress's pixel limit, honoured too when the classifier decodes (its fallback during a rollout)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)


class ServeArgs(BaseModel):
    """Arguments of the taxonet Serve application; only ``checkpoint`` is required."""

    model_config = ConfigDict(extra="forbid")

    #: checkpoint directory: local path, file:// or s3:// (S3 settings from the environment)
    checkpoint: str = Field(min_length=1)
    #: "auto" (CUDA when the replica was given a GPU), "cpu", "cuda" or "cuda:N"
    device: str = "auto"
    #: on CPU, run the model as a frozen TorchScript graph (no GIL during the forward pass; checked against the
    #: eager model at load, which is kept if tracing fails); no effect on CUDA
    graph: bool = True
    top_k: int = Field(3, ge=1)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    #: limit on one image's encoded size (a raw body, or one multipart file)
    max_image_bytes: int = Field(10 * MIB, ge=1)
    #: limit on one image's decoded pixel count: decompression bombs are refused from the header
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    #: most images in one multipart request
    max_files: int = Field(32, ge=1)
    #: limit on a whole request body (multipart)
    max_request_bytes: int = Field(64 * MIB, ge=1)
    #: bearer token required on /v1/*; null → $TAXONET_API_TOKEN in the ingress replica, unset → no auth
    api_token: SecretStr | None = None
    #: queue unsure answers (and an audit sample) for expert review; null = off
    review_queue: ReviewQueueArgs | None = None
    ingress: DeploymentArgs = Field(default_factory=DeploymentArgs)
    classifier: DeploymentArgs = Field(default_factory=_default_classifier)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_batching(self) -> "ServeArgs":
        # A replica never holds more than max_ongoing_requests calls, so a bigger batch could never fill.
        if self.classifier.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"classifier.max_ongoing_requests ({self.classifier.max_ongoing_requests}) must be at "
                             f"least max_batch_size ({self.max_batch_size})")
        return self

    def classifier_config(self) -> ClassifierConfig:
        return ClassifierConfig(checkpoint=self.checkpoint, top_k=self.top_k, max_batch_size=self.max_batch_size,
                                batch_wait_timeout_s=self.batch_wait_timeout_s, max_image_pixels=self.max_image_pixels)

    def ingress_settings(self) -> "IngressSettings":
        return IngressSettings(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                               max_files=self.max_files, max_request_bytes=self.max_request_bytes,
                               api_token=self.api_token, review_queue=self.review_queue)


class IngressSettings(BaseModel):
    """The request limits and the token, as the ingress replica receives them."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: int = 10 * MIB
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 32
    max_request_bytes: int = 64 * MIB
    api_token: SecretStr | None = None
    review_queue: ReviewQueueArgs | None = None

    def token(self) -> str | None:
        """The configured token, else $TAXONET_API_TOKEN (read in the replica, where the Secret is mounted)."""
        if self.api_token is not None and self.api_token.get_secret_value():
            return self.api_token.get_secret_value()
        return os.environ.get(TOKEN_ENV) or None
