"""The Helm chart: values and schema; lint and render with Helm's own engine (helm binary or helm-python-sdk), then
the same manifest checks as the kustomize overlays, for the default, cpu-dev and gpu values and as a subchart."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_support import (CHART_DIR, CHART_VALUES_FILES, REPO_ROOT, HelmError, HelmRenderer, deep_merge,
                         load_generator, load_run_config, pinned_ray_version, validate_serve_args)

import k8s_checks as checks

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

#: the chart's default existing Secrets, documented in values.yaml, NOTES.txt and docs/deploy.md
DEFAULT_EXISTING_SECRETS = {"taxonet-s3", "taxonet-api-token"}
LAPTOP_BUDGET = {"cpu": 4.0, "memory": 8 * 2**30}


def errors_for(schema: dict[str, Any], values: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(values)]


def values_file(helm: HelmRenderer, name: str) -> dict[str, Any]:
    return helm.values_from_yaml(CHART_VALUES_FILES[name].read_text(encoding="utf-8"))


def render(helm: HelmRenderer, values: dict[str, Any] | None = None, release: str = "taxonet",
           chart: Path = CHART_DIR) -> tuple[list[dict[str, Any]], str]:
    """(documents, NOTES text or "") of a `helm template`."""
    files = helm.template(values, release=release, chart=chart)
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
    problems += [e for doc in docs for e in checks.security_errors(doc) + checks.read_only_root_errors(doc)]
    problems += [e for doc in docs for e in checks.object_store_errors(doc)]
    problems += checks.secret_reference_errors(docs, existing) + checks.s3_secret_errors(docs)
    problems += checks.pod_monitor_errors(docs)
    for service in (d for d in docs if d["kind"] == "RayService"):
        problems += checks.serve_capacity_errors(service)
        for app in checks.parse_serve_config(service)["applications"]:
            validate_serve_args(app["args"])
    for job in (d for d in docs if d["kind"] == "RayJob"):
        name, overrides = checks.train_entrypoint(job)
        config = load_run_config(name, overrides)
        problems += checks.train_capacity_errors(job, config.train.num_workers, config.train.use_gpu,
                                                 config.train.cpus_per_worker, config.train.gpus_per_worker)
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------------------------------------
# Without rendering: values files against values.schema.json

def test_values_files_validate_against_the_schema(helm: HelmRenderer, chart_values, chart_schema) -> None:
    jsonschema.Draft7Validator.check_schema(chart_schema)
    assert not errors_for(chart_schema, chart_values)
    for name in CHART_VALUES_FILES:
        merged = deep_merge(chart_values, values_file(helm, name))
        assert not errors_for(chart_schema, merged), name


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
    "dataset on GCS (code reads it as a local directory gs:)": ({"train": {"dataset": "gs://b/insects"}}, "dataset"),
    "storage on Azure": ({"train": {"storage": "abfs://c@a.dfs.core.windows.net/runs"}}, "storage"),
    "relative storage path": ({"train": {"storage": "runs"}}, "storage"),
    "registry over HTTP": ({"train": {"registry": {"uri": "http://host/models"}}}, "uri"),
    "weights on GCS": ({"weights": {"uri": "gs://b/w.pt"}}, "uri"),
    "serving a GCS model": ({"serve": {"args": {"model": "gs://b/models/x@production"}}}, "model"),
    "no model reference": ({"serve": {"args": {"model": ""}}}, "model"),
    "malformed import path": ({"serve": {"importPath": "taxonet serve app"}}, "importPath"),
    "unknown auth mode": ({"ray": {"authMode": "password"}}, "authMode"),
    "unknown API auth": ({"serve": {"auth": "basic"}}, "auth"),
    "upper-case name": ({"fullnameOverride": "Taxonet"}, "fullnameOverride"),
    "worker group name with underscore": ({"serve": {"workerGroups": {"gpu_big": {}}}}, "gpu_big"),
    "quantity typo": ({"serve": {"head": {"resources": {"limits": {"memory": "8 GB"}}}}}, "memory"),
    "object store in GB": ({"train": {"head": {"objectStoreMemory": "2GB"}}}, "objectStoreMemory"),
    "token in Serve args": ({"serve": {"args": {"api_token": "secret"}}}, "api_token"),
    "override of a key the chart sets": ({"train": {"overrides": {"train.storage": "s3://x/y"}}}, "train.storage"),
    "override without a section": ({"train": {"overrides": {"epochs": 3}}}, "epochs"),
    "override text a second shell expands": ({"train": {"overrides": {"train.run_name": "$HOME"}}}, "run_name"),
    "override text a second shell splits": ({"train": {"overrides": {"train.run_name": "a;reboot"}}}, "run_name"),
    "override with a quote": ({"train": {"overrides": {"train.run_name": "it's"}}}, "run_name"),
    "override list (globbed by the second shell)": ({"train": {"overrides": {"data.mean": [0.5, 0.5, 0.5]}}},
                                                    "data.mean"),
    "dataset path with a quote": ({"train": {"dataset": "/data/it's"}}, "dataset"),
    "dataset path with a semicolon": ({"train": {"dataset": "/data/x;reboot"}}, "dataset"),
    "review URL with a quote": ({"monitoring": {"prometheusRule": {"reviewUrl": "https://x/'y"}}}, "reviewUrl"),
    "error ratio over 1": ({"monitoring": {"prometheusRule": {"errorRatio": 5}}}, "errorRatio"),
    "no operator selector": ({"networkPolicy": {"operatorPodSelectors": []}}, "operatorPodSelectors"),
    "toleration effect typo": ({"train": {"workerGroups": {"gpu": {"tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedul"}]}}}}, "effect"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case: str, chart_values, chart_schema) -> None:
    override, mentioned = BAD_VALUES[case]
    errors = errors_for(chart_schema, deep_merge(chart_values, override))
    assert errors, f"{case}: accepted"
    assert any(mentioned in error for error in errors), errors


def test_schema_accepts_what_the_storage_layer_reads(chart_values, chart_schema) -> None:
    for uri in ("s3://taxonet/datasets/insects", "file:///data/insects", "/mnt/data/insects"):
        assert not errors_for(chart_schema, deep_merge(chart_values, {"train": {"dataset": uri}})), uri
    parent_values = {"global": {"imageRegistry": "registry.example.com", "storageClass": "fast"}}
    assert not errors_for(chart_schema, deep_merge(chart_values, parent_values)), "global must be allowed"


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
        documented_stack.append((indent, has_doc or inherited))
        previous_comment = ""
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


def test_chart_defaults_follow_the_package(chart_values) -> None:
    """Versions and the Serve application in values.yaml match pyproject.toml and the generated GPU Serve config."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == project["version"]
    assert chart_values["rayVersion"] == pinned_ray_version()
    generator = load_generator()
    app = generator.serve_config_for("gpu", generator.load_packaged_serve_config())["applications"][0]
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
        assert serve[key].get("rayResources", {}) == packaged["ray_actor_options"].get("resources", {})
    assert serve["classifier"]["numGpus"] == next(
        d for d in app["deployments"] if d["name"] == "TaxonetClassifier")["ray_actor_options"].get("num_gpus", 0)


# -------------------------------------------------------------------------------------------------------------
# Rendered with Helm's engine

def test_helm_lint_is_clean(helm: HelmRenderer) -> None:
    assert not helm.lint(), helm.lint()
    for name in CHART_VALUES_FILES:
        assert not helm.lint(values_file(helm, name)), name


def test_default_render_passes_every_check(helm: HelmRenderer, schemas_dir, ray_version: str) -> None:
    docs, notes = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "RayJob", "RayService", "PodMonitor", "PodMonitor", "PrometheusRule",
                            "NetworkPolicy", "PodDisruptionBudget", "ConfigMap", "Job",
                            "Deployment", "Service", "NetworkPolicy"]), kinds  # the review page
    assert_manifests_pass(docs, schemas_dir, ray_version, existing=DEFAULT_EXISTING_SECRETS)
    if notes:  # the helm binary's `template` does not render NOTES.txt
        for name in DEFAULT_EXISTING_SECRETS:
            assert f"get secret {name}" in notes
        assert "port-forward svc/taxonet-serve-serve-svc 8000:8000" in notes
    for name in DEFAULT_EXISTING_SECRETS:
        assert f"create secret generic {name}" in (REPO_ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(CHART_VALUES_FILES))
def test_values_files_render_and_pass_every_check(name: str, helm: HelmRenderer, schemas_dir,
                                                  ray_version: str) -> None:
    docs, _ = render(helm, values_file(helm, name))
    assert_manifests_pass(docs, schemas_dir, ray_version, existing=DEFAULT_EXISTING_SECRETS)
    if name == "cpu-dev":
        assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
        images = {c["image"] for doc in docs for _, t in checks.pod_templates(doc) for c in checks.all_containers(t)
                  if c["name"] != "versitygw"}
        assert images == {"taxonet:0.1.0-cpu"}


def test_chart_as_a_subchart_with_global_values(helm: HelmRenderer, tmp_path: Path, schemas_dir,
                                                ray_version: str) -> None:
    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    shutil.copytree(CHART_DIR, parent / "charts" / "taxonet")
    (parent / "Chart.yaml").write_text("apiVersion: v2\nname: platform\nversion: 1.0.0\n"
                                       "dependencies:\n  - name: taxonet\n    version: 0.3.0\n")
    (parent / "values.yaml").write_text("global:\n  imageRegistry: registry.example.com\n  team: insects\n")
    docs, _ = render(helm, {"taxonet": {"train": {"enabled": False}}}, release="lab", chart=parent)
    assert {d["kind"] for d in docs} >= {"RayService", "PrometheusRule", "NetworkPolicy"}
    assert "RayJob" not in {d["kind"] for d in docs}
    assert_manifests_pass(docs, schemas_dir, ray_version, existing=DEFAULT_EXISTING_SECRETS)
    assert only(docs, "RayService")["metadata"]["name"] == "lab-taxonet-serve"


def test_cpu_dev_values_fit_a_laptop(helm: HelmRenderer) -> None:
    docs, _ = render(helm, values_file(helm, "cpu-dev"))
    totals = checks.requested_resources(docs)
    cpu, memory = sum(c for c, _ in totals.values()), sum(m for _, m in totals.values())
    assert cpu <= LAPTOP_BUDGET["cpu"] and memory <= LAPTOP_BUDGET["memory"], totals
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= {d["kind"] for d in docs}
    assert "Job/taxonet-dataset" in totals and "Job/taxonet-test-api" not in totals
    for kind in ("RayJob", "RayService"):
        cluster = checks.ray_cluster_spec(only(docs, kind))
        assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster


def test_helm_and_kustomize_describe_the_same_deployment(helm: HelmRenderer, rendered_overlays) -> None:
    """Chart defaults = the gpu overlay and values-cpu-dev.yaml = the cpu-dev overlay, apart from names, labels,
    generated Secrets and the image registry."""
    def shape(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        doc = only(docs, kind)
        cluster = checks.ray_cluster_spec(doc)
        groups = {name: (group.get("rayStartParams"), group.get("minReplicas"), group.get("maxReplicas"),
                         group.get("replicas"), group.get("resources"),
                         group["template"]["spec"]["containers"][0]["resources"],
                         group["template"]["spec"].get("nodeSelector"), group["template"]["spec"].get("tolerations"),
                         next(v["emptyDir"] for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"))
                  for name, group in checks.ray_groups(cluster)}
        return {"groups": groups, "autoscaler": cluster.get("autoscalerOptions"), "auth": cluster.get("authOptions"),
                "autoscaling": cluster.get("enableInTreeAutoscaling"), "rayVersion": cluster.get("rayVersion"),
                "entrypoint": shlex.split(doc["spec"].get("entrypoint", "")),
                "serve": checks.parse_serve_config(doc) if kind == "RayService" else None}

    for overlay, values in (("gpu", None), ("cpu-dev", values_file(helm, "cpu-dev"))):
        chart_docs, _ = render(helm, values)
        overlay_docs = checks.load_documents(rendered_overlays[overlay])
        for kind in ("RayJob", "RayService"):
            assert shape(chart_docs, kind) == shape(overlay_docs, kind), (overlay, kind)
        assert only(chart_docs, "PrometheusRule")["spec"] == only(overlay_docs, "PrometheusRule")["spec"], overlay


# --- the training entrypoint -----------------------------------------------------------------------------------

ROUND_TRIP_VALUES = """
train:
  overrides:
    optim.lr: 1e-5
    optim.weight_decay: 1.0e-7
    anomaly.k: 2.5
    loss.alpha: 3.5e-1
    train.max_steps_per_epoch: 1000000
    optim.epochs: 1e2
    train.seed: 9007199254740993
    train.run_name: "exp 2, lr=1e-5 @ 50% + warm-up: a/b"
    model.dropout: 0
    data.cache: never
"""


def test_overrides_round_trip_through_the_rendered_entrypoint(helm: HelmRenderer, tmp_path: Path) -> None:
    """Numbers and strings as Helm reads them from a values file reach `taxonet train --set` unchanged: the
    rendered command goes through KubeRay's submitter shell, Ray's job CLI (which re-joins the words with
    subprocess.list2cmdline) and the job supervisor's shell, and then taxonet's own override parser."""
    values = helm.values_from_yaml(ROUND_TRIP_VALUES)
    docs, _ = render(helm, values)
    entrypoint = only(docs, "RayJob")["spec"]["entrypoint"]
    assert "1e-05" not in entrypoint and "1e+06" not in entrypoint, "Go's %v notation must not reach the command"
    name, overrides = checks.train_entrypoint(only(docs, "RayJob"))

    def words_after_a_shell(command: str) -> list[str]:
        script = f'taxonet() {{ printf "%s\\0" "$@"; }}; {command}'
        result = subprocess.run(["sh", "-c", script], capture_output=True, timeout=30, check=True)
        return result.stdout.decode().split("\0")[:-1]

    submitted = words_after_a_shell(entrypoint)  # KubeRay: `ray job submit ... -- <entrypoint>` in a shell
    assert submitted == shlex.split(entrypoint)[1:], "a POSIX shell splits the command as shlex does"
    supervised = words_after_a_shell(subprocess.list2cmdline(["taxonet", *submitted]))  # Ray: shell=True
    assert supervised == submitted, "the words survive Ray's re-quoting for the second shell"
    config = load_run_config(name, overrides)
    expected = values["train"]["overrides"]
    assert config.optim.lr == 1e-5 and config.optim.weight_decay == 1e-7
    assert config.anomaly.k == 2.5 and config.loss.alpha == 0.35 and config.model.dropout == 0.0
    assert config.train.max_steps_per_epoch == 1_000_000 and config.optim.epochs == 100
    assert config.train.seed == expected["train.seed"], "an integer as Helm holds it (float64 beyond 2**53)"
    assert config.train.run_name == "exp 2, lr=1e-5 @ 50% + warm-up: a/b"
    assert config.data.cache == "never"


def test_fixed_entrypoint_values_are_shell_safe(helm: HelmRenderer) -> None:
    docs, _ = render(helm, {"train": {"dataset": "/mnt/data/insects=v2,@50%", "config": "demo",
                                      "registry": {"name": "my-model", "promote": "staging"}},
                            "weights": {"uri": "s3://taxonet/weights/resnet50.pt"}})
    name, overrides = checks.train_entrypoint(only(docs, "RayJob"))
    assert name == "demo" and "data.dataset=/mnt/data/insects=v2,@50%" in overrides
    assert overrides[-3:] == ["registry.name=my-model", "registry.promote=staging",
                              "model.weights=s3://taxonet/weights/resnet50.pt"]
    wait = only(docs, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["initContainers"][0]["args"]
    assert wait[1:] == ["/mnt/data/insects=v2,@50%/dataset.json", "s3://taxonet/weights/resnet50.pt"]
    docs, _ = render(helm, {"train": {"registry": {"uri": ""}}})
    assert not [o for o in checks.train_entrypoint(only(docs, "RayJob"))[1] if o.startswith("registry.")]


# --- Secrets and auth -----------------------------------------------------------------------------------------

def token_refs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    refs = {}
    for doc in docs:
        for where, template in checks.pod_templates(doc):
            for container in checks.all_containers(template):
                for env in container.get("env") or []:
                    if env["name"] == "TAXONET_API_TOKEN":
                        refs[f"{where} {container['name']}"] = env["valueFrom"]["secretKeyRef"]
    return refs


def test_the_api_token_is_required_by_default(helm: HelmRenderer) -> None:
    docs, _ = render(helm)
    refs = token_refs(docs)
    serve_groups = [w for w in refs if w.startswith("RayService/")]
    assert len(serve_groups) == 3, refs  # head, gpu and cpu groups
    assert all(ref == {"name": "taxonet-api-token", "key": "TAXONET_API_TOKEN"} for ref in refs.values())
    assert not [w for w in refs if w.startswith("RayJob/")], "training pods never get the API token"
    with pytest.raises(HelmError, match="serve.apiToken: the API needs a token"):
        helm.template({"serve": {"apiToken": {"existingSecret": ""}}})


def test_open_api_only_when_asked_for(helm: HelmRenderer) -> None:
    docs, notes = render(helm, {"serve": {"auth": "none", "apiToken": {"existingSecret": ""}}})
    assert not token_refs(docs)
    assert not [d for d in docs if d["kind"] == "Secret"]
    if notes:
        assert "WARNING: serve.auth=none" in notes


def test_chart_made_secrets(helm: HelmRenderer, schemas_dir, ray_version: str) -> None:
    values = {"s3": {"existingSecret": "", "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "example-secret",
                     "endpointUrl": "http://minio.minio.svc:9000"},
              "serve": {"apiToken": {"existingSecret": "", "value": "token-a,token-b"}}}
    docs, _ = render(helm, values)
    assert_manifests_pass(docs, schemas_dir, ray_version, existing=set())
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}
    assert secrets["taxonet-s3"]["AWS_ENDPOINT_URL_S3"] == "http://minio.minio.svc:9000"
    assert secrets["taxonet-api-token"] == {"TAXONET_API_TOKEN": "token-a,token-b"}


def test_generated_credentials_and_dev_s3_endpoint(helm: HelmRenderer) -> None:
    docs, _ = render(helm, values_file(helm, "cpu-dev"))
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}
    s3, token = secrets["taxonet-s3"], secrets["taxonet-api-token"]["TAXONET_API_TOKEN"]
    assert re.fullmatch(r"taxonet[A-Za-z0-9]{13}", s3["AWS_ACCESS_KEY_ID"])
    assert re.fullmatch(r"[A-Za-z0-9]{40}", s3["AWS_SECRET_ACCESS_KEY"]) and re.fullmatch(r"[A-Za-z0-9]{48}", token)
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "taxonet-s3")
    assert s3["AWS_ENDPOINT_URL_S3"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    again, _ = render(helm, values_file(helm, "cpu-dev"))
    other = {d["metadata"]["name"]: d["stringData"] for d in again if d["kind"] == "Secret"}["taxonet-s3"]
    assert other["AWS_SECRET_ACCESS_KEY"] != s3["AWS_SECRET_ACCESS_KEY"], "random per fresh install (offline)"


def test_helm_rejects_inconsistent_values(helm: HelmRenderer) -> None:
    with pytest.raises(HelmError, match="replicas"):
        helm.template({"serve": {"workerGroups": {"gpu": {"replicas": -1}}}})
    with pytest.raises(HelmError, match="minReplicas"):
        helm.template({"train": {"workerGroups": {"gpu": {"minReplicas": 5, "maxReplicas": 4}}}})
    with pytest.raises(HelmError, match="DNS-1035"):
        helm.template(release="1st")
    with pytest.raises(HelmError, match="accessKeyId"):
        helm.template({"s3": {"existingSecret": ""}})
    with pytest.raises(HelmError, match="shmSize .* must be at least objectStoreMemory"):
        helm.template({"serve": {"workerGroups": {"gpu": {"objectStoreMemory": "8Gi"}}}})
    with pytest.raises(HelmError, match="taxonet_ingress"):
        helm.template({"serve": {"workerGroups": {"cpu": {"enabled": False}}}})
    with pytest.raises(HelmError, match="dataset.synthetic needs train.dataset on S3"):
        helm.template({"dataset": {"synthetic": {"enabled": True}}, "train": {"dataset": "/data/x"}})


# --- optional parts ---------------------------------------------------------------------------------------------

def test_training_and_serving_are_optional(helm: HelmRenderer) -> None:
    docs, _ = render(helm, {"train": {"enabled": False}})
    assert "RayJob" not in {d["kind"] for d in docs} and "RayService" in {d["kind"] for d in docs}
    docs, _ = render(helm, {"serve": {"enabled": False}, "monitoring": {"enabled": False}})
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"RayService", "PodDisruptionBudget", "ConfigMap", "PrometheusRule", "PodMonitor", "Job"}


def test_prometheus_rule_thresholds_come_from_values(helm: HelmRenderer) -> None:
    generator = load_generator()
    docs, _ = render(helm)
    assert only(docs, "PrometheusRule")["spec"]["groups"] == generator.render_rule_groups(generator.AlertSettings())
    custom = {"errorRatio": 0.05, "latencyP99Seconds": 0.25, "noModelFor": "5m", "unsureFactor": 3,
              "reviewUrl": "https://review.example.com/taxonet?rank=species"}
    docs, _ = render(helm, {"monitoring": {"prometheusRule": {**custom, "labels": {"release": "kps"}}}})
    rule = only(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    settings = generator.AlertSettings(error_ratio=0.05, latency_p99_seconds=0.25, no_model_for="5m",
                                       unsure_factor=3, review_url=custom["reviewUrl"])
    assert rule["spec"]["groups"] == generator.render_rule_groups(settings)
    assert not [d for d in render(helm, {"monitoring": {"prometheusRule": {"enabled": False}}})[0]
                if d["kind"] == "PrometheusRule"]


def test_network_policy_selectors_are_configurable(helm: HelmRenderer) -> None:
    docs, _ = render(helm, {"networkPolicy": {"scraperPodSelectors": [{"app": "my-scraper"}],
                                              "serveFrom": [{"podSelector": {"matchLabels": {"app": "gateway"}}}]}})
    ingress = next(d for d in docs if d["metadata"]["name"] == "taxonet-ray")["spec"]["ingress"]
    metrics = next(r for r in ingress if {p["port"] for p in r.get("ports", [])} == {8080, 44217, 44227})
    assert [p["podSelector"]["matchLabels"] for p in metrics["from"]] == [{"app": "my-scraper"}]
    operator = next(r for r in ingress if 52365 in {p["port"] for p in r.get("ports", [])})
    assert [p["podSelector"]["matchLabels"] for p in operator["from"]] == [
        {"app.kubernetes.io/name": "kuberay-operator"}, {"app.kubernetes.io/name": "kuberay"}]
    api = next(r for r in ingress if [p["port"] for p in r.get("ports", [])] == [8000])
    peers = [p["podSelector"]["matchLabels"] for p in api["from"]]
    assert {"app": "gateway"} in peers and any(p.get("app.kubernetes.io/component") == "helm-test" for p in peers)


def test_helm_test_hook_checks_the_api_with_the_token(helm: HelmRenderer) -> None:
    docs, _ = render(helm)
    test = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["annotations"].get("helm.sh/hook") == "test")
    container = test["spec"]["template"]["spec"]["containers"][0]
    script = container["command"][2]
    compile(script, "helm-test", "exec")
    for needed in ('"/healthz"', '"/v1/taxonomy"', '"/readyz"', "Authorization", "401"):
        assert needed in script, needed
    env = {e["name"]: e for e in container["env"]}
    assert env["BASE_URL"]["value"] == "http://taxonet-serve-serve-svc.taxonet.svc:8000"
    assert env["TAXONET_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "taxonet-api-token"
    docs, _ = render(helm, {"serve": {"test": {"enabled": False}}})
    assert not [d for d in docs if d["kind"] == "Job"]


def test_weights_staging_job(helm: HelmRenderer) -> None:
    docs, _ = render(helm, values_file(helm, "gpu"))
    stage = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"].endswith("stage-weights"))
    command = stage["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["taxonet", "models", "stage-weights", "resnet50", "s3://taxonet/weights/resnet50.pt"]
    name, overrides = checks.train_entrypoint(only(docs, "RayJob"))
    assert load_run_config(name, overrides).model.weights == "s3://taxonet/weights/resnet50.pt"
    with pytest.raises(HelmError, match="weights.uri is required"):
        helm.template({"weights": {"stageJob": {"enabled": True}}})


def test_gpu_pool_selector_is_opt_in(helm: HelmRenderer) -> None:
    default, _ = render(helm)
    for kind in ("RayJob", "RayService"):
        group = next(g for g in checks.ray_cluster_spec(only(default, kind))["workerGroupSpecs"]
                     if g["groupName"] == "gpu")
        assert "nodeSelector" not in group["template"]["spec"] and group["template"]["spec"]["tolerations"]
    opted, _ = render(helm, values_file(helm, "gpu"))
    group = next(g for g in checks.ray_cluster_spec(only(opted, "RayJob"))["workerGroupSpecs"]
                 if g["groupName"] == "gpu")
    assert group["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_serve_http_options_reach_the_serve_config(helm: HelmRenderer) -> None:
    docs, _ = render(helm, {"serve": {"httpOptions": {"request_timeout_s": 60}}})
    http = checks.parse_serve_config(only(docs, "RayService"))["http_options"]
    assert http == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 60}
    with pytest.raises(HelmError, match="httpOptions"):
        helm.template({"serve": {"httpOptions": {"request_timeout": 60}}})
