"""The kustomize overlays render, validate against the strict schemas and follow KubeRay's rules."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import yaml
from k8s_support import OVERLAYS, REPO_ROOT, load_generator

import k8s_checks as checks

pytestmark = pytest.mark.k8s

#: Secrets the gpu overlay expects to exist (created by hand, see docs/deploy.md), never rendered from git
DOCUMENTED_EXISTING_SECRETS = {"gpu": {"taxonet-s3"}, "cpu-dev": set()}
EXPECTED_KINDS = {"Namespace", "ServiceAccount", "RayJob", "RayService", "PodMonitor", "NetworkPolicy",
                  "PodDisruptionBudget", "ConfigMap"}


@pytest.fixture(scope="module")
def docs(rendered_overlays: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {name: checks.load_documents(text) for name, text in rendered_overlays.items()}


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_resource(overlay: str, docs: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {d["kind"] for d in docs[overlay]}
    assert EXPECTED_KINDS <= kinds, f"missing kinds: {EXPECTED_KINDS - kinds}"
    monitors = sorted(d["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
                      for d in docs[overlay] if d["kind"] == "PodMonitor")
    assert monitors == ["head", "worker"]
    # the Serve config ConfigMaps are kustomize-local inputs and must not reach the cluster
    config_maps = [d["metadata"]["name"] for d in docs[overlay] if d["kind"] == "ConfigMap"]
    assert config_maps == ["taxonet-grafana-dashboard"]
    assert {(d["metadata"].get("namespace")) for d in docs[overlay] if d["kind"] != "Namespace"} == \
        {only(docs[overlay], "Namespace")["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_strict_schemas(overlay: str, docs, schemas_dir) -> None:
    errors = [e for doc in docs[overlay] for e in checks.schema_errors(doc, schemas_dir)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_null_values(overlay: str, docs) -> None:
    nulls = [f"{checks.describe(doc)}{path}" for doc in docs[overlay] for path in checks.find_nulls(doc)]
    assert not nulls, nulls


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_operator_rules(overlay: str, docs, ray_version: str) -> None:
    errors = [e for doc in docs[overlay] for e in checks.kuberay_rule_errors(doc, ray_version)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_restricted_and_have_limits(overlay: str, docs) -> None:
    errors = [e for doc in docs[overlay] for e in checks.security_errors(doc)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_references_resolve(overlay: str, docs) -> None:
    assert not checks.secret_reference_errors(docs[overlay], DOCUMENTED_EXISTING_SECRETS[overlay])
    assert not checks.s3_secret_errors(docs[overlay])


def test_generated_secret_name_survives_in_ray_pod_templates(docs) -> None:
    """kustomize's hash suffix must be rewritten inside the RayJob/RayService templates (KUBERNETES.md)."""
    secret = only(docs["cpu-dev"], "Secret")["metadata"]["name"]
    assert secret.startswith("taxonet-s3-"), secret
    referenced = {name for doc in docs["cpu-dev"] for _, name, optional in checks.secret_references(doc)
                  if not optional}
    assert referenced == {secret}
    data = only(docs["cpu-dev"], "Secret")["data"]
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3"}


def test_gpu_overlay_documents_the_existing_secret(docs) -> None:
    """The gpu overlay renders no Secret; the one it needs is created by the commands in the docs."""
    assert not [d for d in docs["gpu"] if d["kind"] == "Secret"]
    for path in (REPO_ROOT / "docs" / "deploy.md", REPO_ROOT / "k8s" / "overlays" / "gpu" / "kustomization.yaml"):
        text = path.read_text(encoding="utf-8")
        for name in DOCUMENTED_EXISTING_SECRETS["gpu"]:
            assert f"create secret generic {name}" in text, f"{path} does not show how to create Secret {name}"
    example = (REPO_ROOT / "k8s" / "overlays" / "gpu" / "s3.env.example").read_text(encoding="utf-8")
    keys = {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")}
    assert keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3"}
    assert "CHANGE_ME" in example, "example env files hold placeholders only"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_monitors_scrape_declared_ports(overlay: str, docs) -> None:
    assert not checks.pod_monitor_errors(docs[overlay])
    for monitor in (d for d in docs[overlay] if d["kind"] == "PodMonitor"):
        assert monitor["metadata"]["labels"].get("release"), "kube-prometheus-stack selects monitors by release"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_agrees_with_the_packaged_one(overlay: str, docs) -> None:
    packaged = load_generator().load_packaged_serve_config()
    embedded = checks.parse_serve_config(only(docs[overlay], "RayService"))
    assert checks.serve_structure(embedded) == checks.serve_structure(packaged)
    app, packaged_app = embedded["applications"][0], packaged["applications"][0]
    assert set(app["args"]) == set(packaged_app["args"])
    assert app["args"]["checkpoint"].startswith("s3://")
    for deployment in app["deployments"]:
        assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(deployment["autoscaling_config"])
    if overlay == "gpu":
        assert embedded == packaged, "the GPU overlay serves the package's Serve config unchanged"
    else:
        assert all("num_gpus" not in d["ray_actor_options"] for d in app["deployments"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_autoscaling_fits_the_worker_groups(overlay: str, docs) -> None:
    service = only(docs[overlay], "RayService")
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert not checks.serve_capacity_errors(service)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_entrypoint_is_a_valid_run_that_fits(overlay: str, docs) -> None:
    from taxonet.config import load_config

    job = only(docs[overlay], "RayJob")
    config_name, overrides = checks.train_entrypoint(job)
    config = load_config(config_name, overrides)  # unknown keys or bad values raise ConfigError
    assert config.data.dataset.startswith("s3://") and config.train.storage.startswith("s3://")
    errors = checks.train_capacity_errors(job, config.train.num_workers, config.train.use_gpu,
                                          config.train.cpus_per_worker, config.train.gpus_per_worker)
    assert not errors, errors
    assert config.train.use_gpu is (overlay == "gpu")


def test_gpu_overlay_uses_gpu_pools_and_cpu_dev_none(docs) -> None:
    for kind in ("RayJob", "RayService"):
        gpu_groups = [g["groupName"] for g in checks.ray_cluster_spec(only(docs["gpu"], kind))["workerGroupSpecs"]
                      if checks.container_resources(g["template"])["gpu"]]
        assert gpu_groups == ["gpu"], kind
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs["cpu-dev"])
    assert "tolerations" not in yaml.safe_dump_all(docs["cpu-dev"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_sets_the_image_everywhere(overlay: str, docs) -> None:
    images = {c["image"] for doc in docs[overlay] for _, t in checks.pod_templates(doc)
              for c in t["spec"]["containers"]}
    expected = {"cpu-dev": "taxonet:0.1.0-cpu", "gpu": "registry.example.com/taxonet:0.1.0-gpu"}[overlay]
    assert images == {expected}


def test_serve_import_path_imports_and_accepts_the_args(docs) -> None:
    """The application builder named in every serveConfigV2 imports, and its argument model accepts the args."""
    apps = [app for overlay in OVERLAYS
            for app in checks.parse_serve_config(only(docs[overlay], "RayService"))["applications"]]
    for path in sorted({app["import_path"] for app in apps}):
        module_name, _, attribute = path.partition(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attribute)), f"{path} is not callable"
    from taxonet.serve.config import ServeArgs

    for app in apps:
        ServeArgs.model_validate(app["args"])  # extra="forbid": a misspelt argument fails here, not in the cluster


# -------------------------------------------------------------------------------------------------------------
# The checks above must be able to fail: break a rendered manifest in the ways users do and expect a report.

def _mutate(doc: dict[str, Any], change) -> dict[str, Any]:  # noqa: ANN001
    broken = copy.deepcopy(doc)
    change(broken)
    return broken


def test_checks_reject_broken_manifests(docs, schemas_dir, ray_version: str) -> None:
    job, service = only(docs["gpu"], "RayJob"), only(docs["gpu"], "RayService")
    job_groups = lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"]  # noqa: E731
    schema_cases = {
        "unknown kind": _mutate(job, lambda d: d.update(kind="RayJobs")),
        "old apiVersion": _mutate(only(docs["gpu"], "PodDisruptionBudget"),
                                  lambda d: d.update(apiVersion="policy/v1beta1")),
        "typo minReplica": _mutate(job, lambda d: job_groups(d)[0].update(minReplica=1)),
        "string replicas": _mutate(job, lambda d: job_groups(d)[0].update(replicas="2")),
    }
    for case, doc in schema_cases.items():
        assert checks.schema_errors(doc, schemas_dir), f"schema check missed: {case}"

    rule_cases = {
        "int rayStartParams": _mutate(job, lambda d: job_groups(d)[0].update(rayStartParams={"num-cpus": 4})),
        "no GPU toleration": _mutate(job, lambda d: job_groups(d)[0]["template"]["spec"].pop("tolerations")),
        "no GPU node selector": _mutate(job, lambda d: job_groups(d)[0]["template"]["spec"].pop("nodeSelector")),
        "num-gpus duplicated": _mutate(job, lambda d: job_groups(d)[0].update(rayStartParams={"num-gpus": "1"})),
        "min > max": _mutate(job, lambda d: job_groups(d)[0].update(minReplicas=5, maxReplicas=4)),
        "duplicate group": _mutate(job, lambda d: job_groups(d)[1].update(groupName="gpu")),
        "name too long": _mutate(job, lambda d: d["metadata"].update(name="t" * 48)),
        "name with dot": _mutate(service, lambda d: d["metadata"].update(name="taxonet.serve")),
        "rayVersion drift": _mutate(job, lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.52.0")),
        "restartPolicy": _mutate(job, lambda d: job_groups(d)[0]["template"]["spec"].update(restartPolicy="Always")),
        "ttl without shutdown": _mutate(job, lambda d: d["spec"].update(shutdownAfterJobFinishes=False)),
        "bad upgrade type": _mutate(service, lambda d: d["spec"].update(upgradeStrategy={"type": "BlueGreen"})),
        "serve config not YAML": _mutate(service, lambda d: d["spec"].update(serveConfigV2="applications: [")),
        "fractional GPU": _mutate(service, lambda d: d["spec"].update(
            serveConfigV2=d["spec"]["serveConfigV2"].replace("num_gpus: 1", "num_gpus: 0.5"))),
        "malformed import path": _mutate(service, lambda d: d["spec"].update(
            serveConfigV2=d["spec"]["serveConfigV2"].replace("taxonet.serve.app:app_builder", "taxonet serve app"))),
        "sidecar first": _mutate(job, lambda d: job_groups(d)[0]["template"]["spec"]["containers"].insert(
            0, {"name": "log-shipper", "image": "busybox"})),
    }
    for case, doc in rule_cases.items():
        assert checks.kuberay_rule_errors(doc, ray_version), f"KubeRay rule check missed: {case}"

    assert checks.find_nulls(_mutate(job, lambda d: job_groups(d)[0]["template"]["spec"]["containers"][0].update(
        env=None)))
    assert checks.security_errors(_mutate(service, lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"][
        "template"]["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True)))
    missing_secret = _mutate(job, lambda d: job_groups(d)[0]["template"]["spec"]["containers"][0].update(
        envFrom=[{"secretRef": {"name": "s3-typo"}}]))
    assert checks.secret_reference_errors([missing_secret], {"taxonet-s3"})
    no_secret = _mutate(job, lambda d: job_groups(d)[1]["template"]["spec"]["containers"][0].pop("envFrom"))
    assert checks.s3_secret_errors([no_secret])
    monitor = only([d for d in docs["gpu"] if d["kind"] == "PodMonitor" and "head" in d["metadata"]["name"]],
                   "PodMonitor")
    undeclared = _mutate(monitor, lambda d: d["spec"]["podMetricsEndpoints"].append({"port": "serve-metrics"}))
    assert checks.pod_monitor_errors([job, service, undeclared])
    small_pool = _mutate(service, lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas=2))
    assert checks.serve_capacity_errors(small_pool)
    assert checks.train_capacity_errors(job, num_workers=9, use_gpu=True, cpus_per_worker=8, gpus_per_worker=1)
    with pytest.raises(ValueError, match="taxonet train"):
        checks.train_entrypoint(_mutate(job, lambda d: d["spec"].update(entrypoint="python train.py")))
