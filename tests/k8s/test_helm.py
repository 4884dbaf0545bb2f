"""The Helm chart: values and schema without Helm; lint, render and the manifest checks where Helm is available."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_support import CHART_DIR, REPO_ROOT, HelmError, HelmRenderer, deep_merge, load_generator, pinned_ray_version

import k8s_checks as checks

pytestmark = pytest.mark.k8s

#: the chart's default existing Secret, documented in values.yaml and NOTES.txt
DEFAULT_EXISTING_SECRET = "taxonet-s3"

CPU_VALUES: dict[str, Any] = {
    "image": {"flavor": "cpu"},
    "train": {"config": "demo", "numWorkers": 2, "useGpu": False,
              "workerGroups": {"gpu": {"enabled": False},
                               "cpu": {"replicas": 2, "minReplicas": 2, "maxReplicas": 3,
                                       "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                     "limits": {"cpu": "2", "memory": "4Gi"}}}}},
    "serve": {"args": {"device": "cpu", "max_batch_size": 8},
              "classifier": {"numGpus": 0, "autoscaling": {"maxReplicas": 2}},
              "ingress": {"autoscaling": {"maxReplicas": 2}},
              "workerGroups": {"gpu": {"enabled": False},
                               "cpu": {"enabled": True, "replicas": 1, "minReplicas": 1, "maxReplicas": 2,
                                       "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                                     "limits": {"cpu": "2", "memory": "4Gi"}}}}},
}


def errors_for(schema: dict[str, Any], values: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(values)]


def render(helm: HelmRenderer, values: dict[str, Any] | None = None, release: str = "taxonet"
           ) -> tuple[list[dict[str, Any]], str]:
    """(documents, NOTES text or "") of a `helm template`."""
    files = helm.template(values, release=release)
    notes = "".join(text for name, text in files.items() if name.endswith("NOTES.txt"))
    text = "\n---\n".join(text for name, text in sorted(files.items()) if not name.endswith("NOTES.txt"))
    return checks.load_documents(text), notes


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {[checks.describe(d) for d in found]}"
    return found[0]


def assert_manifests_pass(docs: list[dict[str, Any]], schemas_dir, ray_version: str, existing: set[str]) -> None:
    """The same checks as for the kustomize overlays."""
    problems = [e for doc in docs for e in checks.schema_errors(doc, schemas_dir)]
    problems += [f"{checks.describe(doc)}{path}: null" for doc in docs for path in checks.find_nulls(doc)]
    problems += [e for doc in docs for e in checks.kuberay_rule_errors(doc, ray_version)]
    problems += [e for doc in docs for e in checks.security_errors(doc)]
    problems += checks.secret_reference_errors(docs, existing) + checks.s3_secret_errors(docs)
    problems += checks.pod_monitor_errors(docs)
    for service in (d for d in docs if d["kind"] == "RayService"):
        problems += checks.serve_capacity_errors(service)
    for job in (d for d in docs if d["kind"] == "RayJob"):
        from taxonet.config import load_config

        name, overrides = checks.train_entrypoint(job)
        config = load_config(name, overrides)
        problems += checks.train_capacity_errors(job, config.train.num_workers, config.train.use_gpu,
                                                 config.train.cpus_per_worker, config.train.gpus_per_worker)
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------------------------------------
# Without Helm: values.yaml against values.schema.json

def test_values_yaml_validates_against_the_schema(chart_values, chart_schema) -> None:
    jsonschema.Draft7Validator.check_schema(chart_schema)
    assert not errors_for(chart_schema, chart_values)


BAD_VALUES = {
    "negative replicas": ({"train": {"workerGroups": {"gpu": {"replicas": -1}}}}, "replicas"),
    "negative minReplicas": ({"serve": {"workerGroups": {"gpu": {"minReplicas": -2}}}}, "minReplicas"),
    "unknown top-level key": ({"trian": {"enabled": False}}, "trian"),
    "typo in a worker group": ({"serve": {"workerGroups": {"gpu": {"minReplica": 1}}}}, "minReplica"),
    "typo in a section": ({"monitoring": {"podMonitor": {"enabled": True}}}, "podMonitor"),
    "string numWorkers": ({"train": {"numWorkers": "2"}}, "numWorkers"),
    "fractional GPUs per replica": ({"serve": {"classifier": {"numGpus": 0.5}}}, "numGpus"),
    "unknown upgrade strategy": ({"serve": {"upgradeStrategy": "BlueGreen"}}, "upgradeStrategy"),
    "deprecated health threshold": ({"serve": {"serviceUnhealthySecondThreshold": 900}}, "serviceUnhealthy"),
    "no credentials and no existing Secret": ({"s3": {"existingSecret": ""}}, "accessKeyId"),
    "dataset not on object storage": ({"train": {"dataset": "/data/insects"}}, "dataset"),
    "malformed import path": ({"serve": {"importPath": "taxonet serve app"}}, "importPath"),
    "unknown auth mode": ({"ray": {"authMode": "password"}}, "authMode"),
    "upper-case name": ({"fullnameOverride": "Taxonet"}, "fullnameOverride"),
    "worker group name with underscore": ({"serve": {"workerGroups": {"gpu_big": {}}}}, "gpu_big"),
    "quantity typo": ({"serve": {"head": {"resources": {"limits": {"memory": "8 GB"}}}}}, "memory"),
    "token in Serve args": ({"serve": {"args": {"api_token": "secret"}}}, "api_token"),
    "toleration effect typo": ({"train": {"workerGroups": {"gpu": {"tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedul"}]}}}}, "effect"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case: str, chart_values, chart_schema) -> None:
    override, mentioned = BAD_VALUES[case]
    errors = errors_for(chart_schema, deep_merge(chart_values, override))
    assert errors, f"{case}: accepted"
    assert any(mentioned in error for error in errors), errors


def test_every_value_has_a_doc_comment() -> None:
    """helm-docs convention: each key has a `# --` comment, unless an ancestor documented as a whole holds it."""
    undocumented = []
    documented_stack: list[tuple[int, bool]] = []  # (indent, documented as a whole)
    previous_comment = ""
    for number, line in enumerate((CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            previous_comment = stripped if stripped.startswith("# --") else previous_comment
            continue
        key = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):(.*)$", line)
        if not stripped or stripped.startswith("- ") or not key:
            previous_comment = ""
            continue
        indent = len(key.group(1))
        while documented_stack and documented_stack[-1][0] >= indent:
            documented_stack.pop()
        inherited = any(whole for _, whole in documented_stack)
        has_doc = previous_comment.startswith("# --")
        if not has_doc and not inherited and key.group(3).strip():
            undocumented.append(f"line {number}: {stripped}")
        elif not has_doc and not inherited and not key.group(3).strip():
            pass  # a section heading: its keys carry the comments
        documented_stack.append((indent, has_doc or inherited))
        previous_comment = ""
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


def test_chart_defaults_follow_the_package(chart_values) -> None:
    """Versions and the Serve application in values.yaml match pyproject.toml and configs/serve.yaml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == project["version"]
    assert chart_values["rayVersion"] == pinned_ray_version()
    app = load_generator().load_packaged_serve_config()["applications"][0]
    serve = chart_values["serve"]
    assert (serve["appName"], serve["routePrefix"], serve["importPath"], serve["args"]) == \
        (app["name"], app["route_prefix"], app["import_path"], app["args"])
    for key, deployment in (("ingress", "TaxonetIngress"), ("classifier", "TaxonetClassifier")):
        packaged = next(d for d in app["deployments"] if d["name"] == deployment)
        scaling = serve[key]["autoscaling"]
        assert (scaling["minReplicas"], scaling["maxReplicas"], scaling["targetOngoingRequests"]) == (
            packaged["autoscaling_config"]["min_replicas"], packaged["autoscaling_config"]["max_replicas"],
            packaged["autoscaling_config"]["target_ongoing_requests"])
        assert serve[key]["maxOngoingRequests"] == packaged["max_ongoing_requests"]
        assert serve[key]["numCpus"] == packaged["ray_actor_options"]["num_cpus"]
    assert serve["classifier"]["numGpus"] == next(
        d for d in app["deployments"] if d["name"] == "TaxonetClassifier")["ray_actor_options"].get("num_gpus", 0)


# -------------------------------------------------------------------------------------------------------------
# With Helm (binary or helm-python-sdk)

def test_helm_lint_is_clean(helm: HelmRenderer) -> None:
    assert not helm.lint(), helm.lint()
    assert not helm.lint(CPU_VALUES)


def test_default_render_passes_every_check(helm: HelmRenderer, schemas_dir, ray_version: str) -> None:
    docs, notes = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "RayJob", "RayService", "PodMonitor", "PodMonitor", "NetworkPolicy",
                            "PodDisruptionBudget", "ConfigMap"]), kinds
    assert_manifests_pass(docs, schemas_dir, ray_version, existing={DEFAULT_EXISTING_SECRET})
    if notes:  # the helm binary's `template` does not render NOTES.txt
        assert f"get secret {DEFAULT_EXISTING_SECRET}" in notes
        assert "port-forward svc/taxonet-serve-serve-svc 8000:8000" in notes
    assert DEFAULT_EXISTING_SECRET in (CHART_DIR / "values.yaml").read_text(encoding="utf-8")


def test_rendered_serve_config_is_the_packaged_one(helm: HelmRenderer) -> None:
    docs, _ = render(helm)
    embedded = checks.parse_serve_config(only(docs, "RayService"))
    assert embedded == load_generator().load_packaged_serve_config()


def test_rendered_serve_args_are_accepted_by_the_app(helm: HelmRenderer) -> None:
    from taxonet.serve.config import ServeArgs

    for values in (None, CPU_VALUES):
        docs, _ = render(helm, values)
        for app in checks.parse_serve_config(only(docs, "RayService"))["applications"]:
            ServeArgs.model_validate(app["args"])


def test_chart_made_secrets(helm: HelmRenderer, schemas_dir, ray_version: str) -> None:
    values = {"s3": {"existingSecret": "", "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "example-secret",
                     "endpointUrl": "http://minio.minio.svc:9000"},
              "serve": {"apiToken": {"value": "example-token"}}}
    docs, _ = render(helm, values)
    assert_manifests_pass(docs, schemas_dir, ray_version, existing=set())
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}
    assert secrets["taxonet-s3"]["AWS_ENDPOINT_URL_S3"] == "http://minio.minio.svc:9000"
    assert secrets["taxonet-api-token"] == {"TAXONET_API_TOKEN": "example-token"}
    token_users = {where.split(" group ")[0] for doc in docs for where, name, _ in checks.secret_references(doc)
                   if name == "taxonet-api-token"}
    assert token_users == {"RayService/taxonet-serve"}, "only serving pods get the API token"


def test_training_and_serving_are_optional(helm: HelmRenderer) -> None:
    docs, _ = render(helm, {"train": {"enabled": False}})
    assert "RayJob" not in {d["kind"] for d in docs} and "RayService" in {d["kind"] for d in docs}
    docs, _ = render(helm, {"serve": {"enabled": False}, "monitoring": {"grafanaDashboard": {"enabled": False}}})
    kinds = {d["kind"] for d in docs}
    assert "RayService" not in kinds and "PodDisruptionBudget" not in kinds and "ConfigMap" not in kinds


def test_cpu_configuration_renders_and_fits(helm: HelmRenderer, schemas_dir, ray_version: str) -> None:
    docs, _ = render(helm, CPU_VALUES)
    assert_manifests_pass(docs, schemas_dir, ray_version, existing={DEFAULT_EXISTING_SECRET})
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    images = {c["image"] for doc in docs for _, t in checks.pod_templates(doc) for c in t["spec"]["containers"]}
    assert images == {"registry.example.com/taxonet:0.1.0-cpu"}


def test_train_overrides_reach_the_entrypoint(helm: HelmRenderer) -> None:
    from taxonet.config import load_config

    docs, _ = render(helm, {"train": {"overrides": {"optim.epochs": 3, "train.run_name": "exp 2"}}})
    name, overrides = checks.train_entrypoint(only(docs, "RayJob"))
    config = load_config(name, overrides)
    assert (config.optim.epochs, config.train.run_name) == (3, "exp 2")


def test_helm_rejects_bad_values(helm: HelmRenderer) -> None:
    with pytest.raises(HelmError, match="replicas"):
        helm.template({"serve": {"workerGroups": {"gpu": {"replicas": -1}}}})
    with pytest.raises(HelmError, match="minReplicas"):
        helm.template({"train": {"workerGroups": {"gpu": {"minReplicas": 5, "maxReplicas": 4}}}})
    with pytest.raises(HelmError, match="DNS-1035"):
        helm.template(release="1st")
    with pytest.raises(HelmError, match="accessKeyId"):
        helm.template({"s3": {"existingSecret": ""}})


def test_helm_and_kustomize_describe_the_same_deployment(helm: HelmRenderer, rendered_overlays) -> None:
    """Chart defaults = the gpu overlay, apart from names, labels and the image registry."""
    chart_docs, _ = render(helm)
    overlay_docs = checks.load_documents(rendered_overlays["gpu"])

    def shape(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        doc = only(docs, kind)
        cluster = checks.ray_cluster_spec(doc)
        groups = {name: (group.get("rayStartParams"), group.get("minReplicas"), group.get("maxReplicas"),
                         group["template"]["spec"]["containers"][0]["resources"],
                         group["template"]["spec"].get("nodeSelector"), group["template"]["spec"].get("tolerations"))
                  for name, group in checks.ray_groups(cluster)}
        return {"groups": groups, "autoscaler": cluster.get("autoscalerOptions"), "auth": cluster.get("authOptions"),
                "rayVersion": cluster.get("rayVersion"), "entrypoint": doc["spec"].get("entrypoint"),
                "serve": checks.parse_serve_config(doc) if kind == "RayService" else None}

    for kind in ("RayJob", "RayService"):
        assert shape(chart_docs, kind) == shape(overlay_docs, kind), kind
