"""The packaged Serve config and the typed application arguments (no Ray cluster needed)."""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from taxonet.serve.config import MODEL_POLL_S, ClassifierConfig, IngressSettings, ServeArgs

pytestmark = pytest.mark.unit


def packaged() -> dict[str, Any]:
    return yaml.safe_load(resources.files("taxonet.configs").joinpath("serve.yaml").read_text(encoding="utf-8"))


def test_packaged_config_is_a_valid_serve_config_for_this_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from taxonet.serve.app import TaxonetClassifier, TaxonetIngress, app_builder

    config = packaged()
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "taxonet.serve.app:app_builder"
    args = ServeArgs.model_validate(app["args"])  # every argument is known and valid
    assert args.checkpoint.startswith("s3://")
    assert {d["name"] for d in app["deployments"]} == {TaxonetIngress.name, TaxonetClassifier.name}
    built = app_builder(app["args"])
    assert built._bound_deployment.name == "TaxonetIngress"


def test_args_are_validated_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="checkpoint"):
        ServeArgs.model_validate({})
    with pytest.raises(ValidationError, match="max_batch_siz"):
        ServeArgs.model_validate({"checkpoint": "x", "max_batch_siz": 8})  # a typo is an error, not ignored
    with pytest.raises(ValidationError, match="device"):
        ServeArgs.model_validate({"checkpoint": "x", "device": "tpu"})
    with pytest.raises(ValidationError, match="max_replicas"):
        ServeArgs.model_validate({"checkpoint": "x", "classifier": {"autoscaling": {"min_replicas": 3,
                                                                                    "max_replicas": 2}}})
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        ServeArgs.model_validate({"checkpoint": "x", "max_batch_size": 128})


def test_classifier_user_config_is_partial_over_the_args_and_strict() -> None:
    args = ServeArgs.model_validate({"checkpoint": "s3://b/one", "top_k": 5, "classifier": {"autoscaling": None,
                                                                                          "num_replicas": 2}})
    base = args.classifier_config().model_dump()
    assert base == {"model": "s3://b/one", "model_poll_s": MODEL_POLL_S, "top_k": 5, "max_batch_size": 32,
                    "batch_wait_timeout_s": 0.01, "max_image_pixels": 40_000_000}
    # a user_config may name the new model under either name; it replaces the args' reference
    for key in ("checkpoint", "model"):
        merged = ClassifierConfig.layered(base, {key: "s3://b/two"})
        assert merged.model == "s3://b/two" and merged.top_k == 5
    assert ClassifierConfig.layered(base, {"top_k": 1}).model == "s3://b/one"
    with pytest.raises(ValidationError):
        ClassifierConfig.layered(base, {"chekpoint": "s3://b/two"})
    with pytest.raises(ValidationError, match="not both"):
        ClassifierConfig.layered(base, {"checkpoint": "s3://b/two", "model": "s3://b/three"})
    assert args.classifier.options()["num_replicas"] == 2 and "autoscaling_config" not in args.classifier.options()


def test_model_is_a_reference_or_a_checkpoint_exactly_once_and_polled() -> None:
    args = ServeArgs.model_validate({"model": "s3://b/models/demo@production"})
    assert args.model == args.checkpoint == "s3://b/models/demo@production"
    assert args.model_poll_s == MODEL_POLL_S and args.ingress_settings().retry_after_s == math.ceil(MODEL_POLL_S)
    assert ServeArgs.model_validate({"checkpoint": "runs/x/best"}).model == "runs/x/best"
    with pytest.raises(ValidationError, match="not both"):
        ServeArgs.model_validate({"model": "a@production", "checkpoint": "runs/x/best"})
    for bad in ("gs://bucket/models/demo@production", "s3://b/models/demo@-bad"):
        with pytest.raises(ValidationError, match="model"):
            ServeArgs.model_validate({"model": bad})
        with pytest.raises(ValidationError, match="model"):
            ClassifierConfig.layered({"model": "x"}, {"model": bad})
    with pytest.raises(ValidationError, match="model_poll_s"):
        ServeArgs.model_validate({"model": "x", "model_poll_s": 0})
    fast = ServeArgs.model_validate({"model": "x", "model_poll_s": 2.5})
    assert fast.classifier_config().model_poll_s == 2.5 and fast.ingress_settings().retry_after_s == 3


def test_token_comes_from_args_or_the_replica_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAXONET_API_TOKEN", raising=False)
    assert IngressSettings().token() is None
    monkeypatch.setenv("TAXONET_API_TOKEN", "from-env")
    assert IngressSettings().token() == "from-env"
    settings = ServeArgs.model_validate({"checkpoint": "x", "api_token": "explicit"}).ingress_settings()
    assert settings.token() == "explicit"
    assert "explicit" not in repr(settings)  # the secret is not printed in logs or `serve status`


def test_access_log_is_per_deployment_and_the_graph_is_on_by_default() -> None:
    args = ServeArgs.model_validate({"checkpoint": "x"})
    assert args.graph is True
    # one line per HTTP request from the ingress; the classifier's calls would only repeat them
    assert args.ingress.options()["logging_config"] == {"enable_access_log": True}
    assert args.classifier.options()["logging_config"] == {"enable_access_log": False}
    args = ServeArgs.model_validate({"checkpoint": "x", "graph": False, "classifier": {"access_log": True}})
    assert args.graph is False and args.classifier.options()["logging_config"] == {"enable_access_log": True}
    with pytest.raises(ValidationError, match="graph"):
        ServeArgs.model_validate({"checkpoint": "x", "graph": "sometimes"})
