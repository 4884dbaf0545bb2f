"""The packaged Serve config and the typed application arguments (no Ray cluster needed)."""

from __future__ import annotations

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
                    "batch_wait_timeout_s": 0.01, "label_series_per_rank": 20}
    # a user_config may name the new model under either name; it replaces the args' reference
    for key in ("checkpoint", "model"):
        merged = ClassifierConfig.layered(base, {key: "s3://b/two"})
        assert merged.model == merged.checkpoint == "s3://b/two" and merged.top_k == 5
    assert ClassifierConfig.layered(base, {"top_k": 1}).model == "s3://b/one"
    with pytest.raises(ValidationError):
        ClassifierConfig.layered(base, {"chekpoint": "s3://b/two"})
    with pytest.raises(ValidationError, match="not both"):
        ClassifierConfig.layered(base, {"checkpoint": "s3://b/two", "model": "s3://b/three"})
    assert args.classifier.options()["num_replicas"] == 2 and "autoscaling_config" not in args.classifier.options()


def test_model_is_a_reference_or_a_checkpoint_exactly_once_and_polled() -> None:
    args = ServeArgs.model_validate({"model": "s3://b/models/demo@production"})
    assert args.model == args.checkpoint == "s3://b/models/demo@production" and args.model_poll_s == MODEL_POLL_S
    assert ServeArgs.model_validate({"checkpoint": "runs/x/best"}).model == "runs/x/best"
    with pytest.raises(ValidationError, match="not both"):
        ServeArgs.model_validate({"model": "a@production", "checkpoint": "runs/x/best"})
    with pytest.raises(ValidationError, match="model_poll_s"):
        ServeArgs.model_validate({"model": "x", "model_poll_s": 0})
    for bad in ("gs://bucket/models/demo@production", "s3://b/models/demo@-bad"):
        with pytest.raises(ValidationError, match="model"):
            ServeArgs.model_validate({"model": bad})
        with pytest.raises(ValidationError, match="model"):
            ClassifierConfig.layered({"model": "x"}, {"model": bad})
    assert ServeArgs.model_validate({"model": "x", "model_poll_s": 2.5}).classifier_config().model_poll_s == 2.5


def test_api_token_in_the_args_is_refused_with_where_to_put_it() -> None:
    with pytest.raises(ValidationError, match="TAXONET_API_TOKEN_FILE") as info:
        ServeArgs.model_validate({"checkpoint": "x", "api_token": "secret"})
    assert "plain text" in str(info.value) and "TAXONET_API_TOKEN" in str(info.value)
    with pytest.raises(ValidationError, match="plain text"):  # nor smuggled into a replica's environment
        ServeArgs.model_validate({"checkpoint": "x", "ingress": {"env_vars": {"TAXONET_API_TOKEN": "secret"}}})
    args = ServeArgs.model_validate({"checkpoint": "x", "ingress": {"env_vars": {"TAXONET_API_TOKEN_FILE": "/t"}}})
    assert args.ingress.options()["ray_actor_options"]["runtime_env"] == {"env_vars": {"TAXONET_API_TOKEN_FILE": "/t"}}


def test_args_are_the_classifier_and_ingress_settings_each_default_once() -> None:
    args = ServeArgs.model_validate({"checkpoint": "x", "max_files": 3, "top_k": 4})
    assert args.classifier_config() == ClassifierConfig(checkpoint="x", top_k=4)
    assert args.ingress_settings() == IngressSettings(max_files=3)
    with pytest.raises(ValidationError, match="decode_pixel_budget"):  # an image at the limit could never decode
        ServeArgs.model_validate({"checkpoint": "x", "max_image_pixels": 100, "decode_pixel_budget": 99})
    with pytest.raises(ValidationError, match="max_concurrent_requests"):
        ServeArgs.model_validate({"checkpoint": "x", "max_concurrent_requests": 100})


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


def test_replaced_replicas_drain_for_as_long_as_their_longest_request() -> None:
    """Serve's default drain (20 s) is shorter than a request may take (body + model answer); a rollout on a loaded
    machine then cut one off with a bare 500. The drains follow the request timeouts."""
    args = ServeArgs(model="/m", body_timeout_s=40, classifier_timeout_s=25)
    ingress, classifier = args.ingress_options(), args.classifier_options()
    assert ingress["graceful_shutdown_timeout_s"] > 40 + 25
    assert 25 < classifier["graceful_shutdown_timeout_s"] < ingress["graceful_shutdown_timeout_s"]
    assert ServeArgs(model="/m").ingress_options()["graceful_shutdown_timeout_s"] > 20  # more than Serve's default
