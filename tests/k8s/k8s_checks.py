"""Offline checks of rendered Kubernetes manifests: strict JSON schemas plus the KubeRay rules schemas cannot express.

Pure functions over parsed YAML documents (dicts); each check returns a list of human-readable problems, empty when
the documents are fine. Schemas are vendored in tests/k8s/schemas (SOURCE.md); the KubeRay rules follow the
operator's validation (ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0) and the team's KubeRay
conventions; the object-store check follows Ray 2.60 (ray/_private/services.py: the object store goes to /dev/shm
only when /dev/shm has room for all of it, else to disk).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

#: KubeRay's name limits (utils/constant.go): the operator appends suffixes to these names
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
RESOURCE_START_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
GPU_RESOURCE = "nvidia.com/gpu"
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[numkKMGTPE]i?)?$")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


# ---------------------------------------------------------------------------------------------------------------
# Parsing and schemas

def load_documents(text: str) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a rendered manifest stream."""
    docs = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"rendered document is not a mapping: {doc!r:.80}")
        docs.append(doc)
    return docs


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def schema_path(schemas_dir: Path, api_version: str, kind: str) -> Path:
    """Schema file for apiVersion/kind following KUBERNETES.md §2.2; KeyError for anything unknown."""
    group, _, version = api_version.rpartition("/")
    if group == "ray.io":
        path = schemas_dir / "kuberay" / f"{kind.lower()}_{version}.json"
    elif group == "monitoring.coreos.com":
        path = schemas_dir / "prometheus-operator" / f"{kind.lower()}_{version}.json"
    else:
        stem = f"{kind.lower()}-{group.split('.')[0]}-{version}" if group else f"{kind.lower()}-{version}"
        path = schemas_dir / "k8s" / "v1.32.2-standalone-strict" / f"{stem}.json"
    if not path.is_file():
        raise KeyError(f"no schema for apiVersion {api_version!r} kind {kind!r} (looked for {path})")
    return path


@cache
def _validator(path: Path) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(path.read_text(encoding="utf-8")))


def schema_errors(doc: dict[str, Any], schemas_dir: Path) -> list[str]:
    """Strict-schema violations of one document; an unknown apiVersion/kind is itself an error."""
    try:
        path = schema_path(schemas_dir, str(doc.get("apiVersion", "")), str(doc.get("kind", "")))
    except KeyError as exc:
        return [f"{describe(doc)}: {exc.args[0]}"]
    return [f"{describe(doc)}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in _validator(path).iter_errors(doc)]


def find_nulls(node: Any, path: str = "") -> list[str]:
    """Paths of every null value (Helm's `toYaml` of empty values gives `env: null`, rejected by real clusters)."""
    if node is None:
        return [path or "<root>"]
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in find_nulls(value, f"{path}/{key}")]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in find_nulls(value, f"{path}/{i}")]
    return []


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "48Gi", 2) as a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in "eE" and len(suffix) > 1:
        return float(number + suffix)
    return float(number) * _SUFFIX[suffix]


# ---------------------------------------------------------------------------------------------------------------
# Ray objects

def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayCluster spec embedded in a RayCluster, RayJob or RayService (None for other kinds)."""
    spec = doc.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}.get(str(doc.get("kind")))


def ray_groups(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    yield "head", cluster.get("headGroupSpec") or {}
    for group in cluster.get("workerGroupSpecs") or []:
        yield str(group.get("groupName")), group


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod a document creates: Ray groups, the RayJob submitter, core workloads."""
    cluster = ray_cluster_spec(doc)
    if cluster is not None:
        for name, group in ray_groups(cluster):
            yield f"{describe(doc)} group {name}", group.get("template") or {}
        submitter = (doc.get("spec") or {}).get("submitterPodTemplate")
        if submitter:
            yield f"{describe(doc)} submitter", submitter
    elif doc.get("kind") in ("Deployment", "StatefulSet", "Job"):
        yield describe(doc), (doc.get("spec") or {}).get("template") or {}


def container_resources(template: dict[str, Any]) -> dict[str, float]:
    """CPU, memory (bytes) and GPU limits of the first (Ray) container; Ray sizes itself from these."""
    containers = (template.get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    return {"cpu": parse_quantity(limits.get("cpu", 0)), "memory": parse_quantity(limits.get("memory", 0)),
            "gpu": parse_quantity(limits.get(GPU_RESOURCE, 0))}


def _tolerates_gpu_taint(tolerations: list[dict[str, Any]]) -> bool:
    for toleration in tolerations or []:
        key = toleration.get("key")
        if key == GPU_RESOURCE or (not key and toleration.get("operator") == "Exists"):  # an empty key tolerates all
            return True
    return False


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def kuberay_rule_errors(doc: dict[str, Any], ray_version: str) -> list[str]:
    """The operator's validation rules that the CRD schema cannot express, plus the GPU conventions."""
    kind = str(doc.get("kind"))
    cluster = ray_cluster_spec(doc)
    if cluster is None:
        return []
    where = describe(doc)
    errors: list[str] = []
    name = str((doc.get("metadata") or {}).get("name", ""))
    if len(name) > MAX_NAME_LENGTH[kind]:
        errors.append(f"{where}: name longer than {MAX_NAME_LENGTH[kind]} characters")
    if not DNS_1035_LABEL.match(name):
        errors.append(f"{where}: name {name!r} is not a DNS-1035 label")
    if cluster.get("rayVersion") != ray_version:
        errors.append(f"{where}: rayVersion {cluster.get('rayVersion')!r} != pinned Ray {ray_version!r}")
    autoscaler_v2 = bool(cluster.get("enableInTreeAutoscaling")) and \
        (cluster.get("autoscalerOptions") or {}).get("version") == "v2"
    if (cluster.get("authOptions") or {}).get("mode") == "token" and \
            _version_tuple(str(cluster.get("rayVersion", "0"))) < (2, 52, 0):
        errors.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
    seen_groups: set[str] = set()
    for group_name, group in ray_groups(cluster):
        at = f"{where} group {group_name}"
        if group_name in seen_groups:
            errors.append(f"{at}: duplicate groupName")
        seen_groups.add(group_name)
        spec = (group.get("template") or {}).get("spec") or {}
        containers = spec.get("containers") or []
        if not containers:
            errors.append(f"{at}: no containers")
            continue
        if not str(containers[0].get("name", "")).startswith("ray-"):
            errors.append(f"{at}: the Ray container must come first (found {containers[0].get('name')!r})")
        params = group.get("rayStartParams")
        if params is None:
            errors.append(f"{at}: rayStartParams missing")
            params = {}
        for key, value in params.items():
            if not isinstance(value, str):
                errors.append(f"{at}: rayStartParams[{key!r}] = {value!r} is not a string")
        if group.get("resources") and any(params.get(key) for key in RESOURCE_START_PARAMS):
            errors.append(f"{at}: resources set both in rayStartParams and the group's resources field")
        if autoscaler_v2 and spec.get("restartPolicy") not in (None, "Never"):
            errors.append(f"{at}: autoscaler v2 needs restartPolicy Never or unset")
        if group_name != "head":
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if not 0 <= low <= high:
                errors.append(f"{at}: needs 0 <= minReplicas ({low}) <= maxReplicas ({high})")
        resources = containers[0].get("resources") or {}
        gpu_limit = (resources.get("limits") or {}).get(GPU_RESOURCE)
        gpu_request = (resources.get("requests") or {}).get(GPU_RESOURCE)
        if gpu_limit:
            if gpu_request is not None and str(gpu_request) != str(gpu_limit):
                errors.append(f"{at}: {GPU_RESOURCE} request {gpu_request} != limit {gpu_limit}")
            # the nvidia.com/gpu request places the pod; a nodeSelector is an opt-in, never required
            if not _tolerates_gpu_taint(spec.get("tolerations")):
                errors.append(f"{at}: GPU group without a toleration for the {GPU_RESOURCE} taint")
            if "num-gpus" in params:
                errors.append(f"{at}: num-gpus in rayStartParams duplicates the {GPU_RESOURCE} limit")
        elif gpu_request:
            errors.append(f"{at}: {GPU_RESOURCE} requested without a limit (KubeRay reads the limit)")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append(f"{where}: one of rayClusterSpec or clusterSelector is required")
        if not spec.get("shutdownAfterJobFinishes", False) and spec.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes", False):
            errors.append(f"{where}: suspend needs shutdownAfterJobFinishes: true")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            errors.append(f"{where}: activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit", 0) < 0:
            errors.append(f"{where}: backoffLimit must not be negative")
        if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            errors.append(f"{where}: backoffLimit is incompatible with InteractiveMode")
        submitter = spec.get("submitterPodTemplate")
        if submitter and (submitter.get("spec") or {}).get("restartPolicy") not in (None, "Never"):
            errors.append(f"{where}: submitter pod restartPolicy must be Never")
        if spec.get("runtimeEnvYAML") is not None:
            try:
                yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as exc:
                errors.append(f"{where}: runtimeEnvYAML is not YAML: {exc}")
    if kind == "RayService":
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade is not None and upgrade not in UPGRADE_TYPES:
            errors.append(f"{where}: upgradeStrategy.type {upgrade!r} not in {sorted(UPGRADE_TYPES)}")
        if upgrade == "NewClusterWithIncrementalUpgrade":
            if not cluster.get("enableInTreeAutoscaling"):
                errors.append(f"{where}: incremental upgrade needs enableInTreeAutoscaling: true")
            if not ((spec.get("upgradeStrategy") or {}).get("clusterUpgradeOptions") or {}).get("gatewayClassName"):
                errors.append(f"{where}: incremental upgrade needs clusterUpgradeOptions.gatewayClassName")
        if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
            errors.append(f"{where}: rayClusterDeletionDelaySeconds must not be negative")
        if "serviceUnhealthySecondThreshold" in spec or "deploymentUnhealthySecondThreshold" in spec:
            errors.append(f"{where}: the *UnhealthySecondThreshold fields are deprecated no-ops")
        try:
            parse_serve_config(doc)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
    return errors


def security_errors(doc: dict[str, Any]) -> list[str]:
    """Restricted Pod Security Standard for every pod template and container we write, plus resource limits."""
    errors: list[str] = []
    for where, template in pod_templates(doc):
        spec = template.get("spec") or {}
        pod_context = spec.get("securityContext") or {}
        if pod_context.get("runAsNonRoot") is not True:
            errors.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if (pod_context.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            at = f"{where} container {container.get('name')}"
            context = container.get("securityContext") or {}
            if context.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{at}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
                errors.append(f"{at}: capabilities do not drop ALL")
            if context.get("privileged"):
                errors.append(f"{at}: privileged")
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (resources.get(kind) or {}):
                        errors.append(f"{at}: no {resource} in resources.{kind}")
    cluster = ray_cluster_spec(doc)
    autoscaler = (cluster or {}).get("autoscalerOptions") or {}
    if cluster is not None and cluster.get("enableInTreeAutoscaling"):
        context = autoscaler.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False or "ALL" not in \
                ((context.get("capabilities") or {}).get("drop") or []):
            errors.append(f"{describe(doc)}: autoscaler sidecar securityContext is not restricted")
        if not (autoscaler.get("resources") or {}).get("limits"):
            errors.append(f"{describe(doc)}: autoscaler sidecar has no resource limits")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Cross-document checks

def all_containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers and containers of a pod template."""
    spec = template.get("spec") or {}
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def secret_references(doc: dict[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(where, Secret name, optional) for every envFrom/env Secret reference in the document's pod templates."""
    for where, template in pod_templates(doc):
        for container in all_containers(template):
            for source in container.get("envFrom") or []:
                ref = source.get("secretRef")
                if ref:
                    yield f"{where} container {container.get('name')}", ref["name"], bool(ref.get("optional"))
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    yield f"{where} container {container.get('name')}", ref["name"], bool(ref.get("optional"))


def secret_reference_errors(docs: list[dict[str, Any]], existing: set[str]) -> list[str]:
    """Every non-optional Secret reference resolves to a rendered Secret or to a documented existing Secret."""
    rendered = {d["metadata"]["name"] for d in docs if d.get("kind") == "Secret"}
    return [f"{where}: Secret {name!r} is neither rendered nor a documented existing Secret"
            for doc in docs for where, name, optional in secret_references(doc)
            if not optional and name not in rendered | existing]


def s3_secret_errors(docs: list[dict[str, Any]]) -> list[str]:
    """The S3 Secret reaches the head and every worker group of every Ray cluster (envFrom)."""
    errors = []
    for doc in docs:
        cluster = ray_cluster_spec(doc)
        if cluster is None:
            continue
        for group_name, group in ray_groups(cluster):
            containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
            if not any(source.get("secretRef") for source in containers[0].get("envFrom") or []):
                errors.append(f"{describe(doc)} group {group_name}: Ray container gets no Secret via envFrom")
    return errors


def pod_monitor_errors(docs: list[dict[str, Any]]) -> list[str]:
    """Each PodMonitor selects Ray pods we render, and every scraped port name is declared on those pods."""
    errors = []
    # KubeRay adds the ray.io/* labels to Ray pods only: a selector using them matches no Deployment or Job pod
    pods = [(where, template, ray_cluster_spec(doc) is not None)
            for doc in docs for where, template in pod_templates(doc)]
    for monitor in (d for d in docs if d.get("kind") == "PodMonitor"):
        selector = (monitor["spec"].get("selector") or {}).get("matchLabels") or {}
        node_type = selector.get("ray.io/node-type")
        own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
        needs_ray = any(key.startswith("ray.io/") for key in selector)
        matched = [(where, t) for where, t, is_ray in pods
                   if all(((t.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in own.items())
                   and (is_ray or not needs_ray)
                   and (node_type is None or where.endswith("group head") == (node_type == "head"))
                   and not where.endswith("submitter")]
        if not matched:
            errors.append(f"{describe(monitor)}: selects no rendered Ray pod template")
        for endpoint in monitor["spec"].get("podMetricsEndpoints") or []:
            for where, template in matched:
                containers = (template.get("spec") or {}).get("containers") or [{}]
                ports = {p.get("name") for p in containers[0].get("ports") or []}
                if endpoint.get("port") not in ports:
                    errors.append(f"{describe(monitor)}: port {endpoint.get('port')!r} not declared on {where}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Serve config and training entrypoint

def parse_serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    """serveConfigV2 of a RayService parsed into a dict (ValueError when it is not a usable Serve config)."""
    text = (doc.get("spec") or {}).get("serveConfigV2")
    if not isinstance(text, str):
        raise ValueError("serveConfigV2 must be a YAML string")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"serveConfigV2 is not YAML: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("applications"), list) or not config["applications"]:
        raise ValueError("serveConfigV2 has no applications list")
    for app in config["applications"]:
        import_path = app.get("import_path")
        if not isinstance(import_path, str) or not re.fullmatch(r"[\w.]+[:.]\w+", import_path):
            raise ValueError(f"application {app.get('name')!r}: import_path missing or malformed")
        for deployment in app.get("deployments") or []:
            gpus = (deployment.get("ray_actor_options") or {}).get("num_gpus", 0)
            if gpus != int(gpus):
                raise ValueError(f"deployment {deployment.get('name')}: fractional num_gpus {gpus} cannot be "
                                 "placed by the Ray autoscaler")
            scaling = deployment.get("autoscaling_config") or {}
            if scaling and not 0 <= scaling.get("min_replicas", 1) <= scaling.get("max_replicas", 1):
                raise ValueError(f"deployment {deployment.get('name')}: needs min_replicas <= max_replicas")
    return config


def serve_structure(config: dict[str, Any]) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(app name, route prefix, import path, deployment names) per application: what must match the package."""
    return [(app.get("name"), app.get("route_prefix"), app.get("import_path"),
             tuple(d["name"] for d in app.get("deployments") or [])) for app in config["applications"]]


def _group_count(cluster: dict[str, Any], group: dict[str, Any]) -> int:
    """Pods a worker group can reach: maxReplicas with the Ray autoscaler, else its fixed replicas."""
    return int(group.get("maxReplicas", 0) if cluster.get("enableInTreeAutoscaling") else group.get("replicas", 0))


def group_ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """Ray resources of one pod of a group: CPU/GPU from the container limits, custom ones from `resources`."""
    offered = {k: v for k, v in container_resources(group.get("template") or {}).items() if k != "memory"}
    for name, amount in (group.get("resources") or {}).items():
        offered[name] = parse_quantity(amount)
    return offered


def serve_capacity_errors(doc: dict[str, Any]) -> list[str]:
    """The worker groups can hold every Serve replica at max_replicas: CPUs, GPUs and custom Ray resources (e.g.
    taxonet_ingress), counted per replica so that one replica never straddles two pods."""
    config = parse_serve_config(doc)
    cluster = ray_cluster_spec(doc) or {}
    pods = [(group_ray_resources(g), _group_count(cluster, g)) for g in cluster.get("workerGroupSpecs") or []]
    demands: list[tuple[str, dict[str, float], int]] = []
    for app in config["applications"]:
        for deployment in app.get("deployments") or []:
            options = deployment.get("ray_actor_options") or {}
            replicas = (deployment.get("autoscaling_config") or {}).get("max_replicas",
                                                                        deployment.get("num_replicas", 1))
            need = {"cpu": float(options.get("num_cpus", 1)), "gpu": float(options.get("num_gpus", 0))}
            need.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
            demands.append((deployment.get("name"), need, int(replicas)))
    # place replicas, biggest demands first, into the pods the groups can reach (first fit)
    free = [dict(res) for res, count in pods for _ in range(count)]
    errors = []
    for name, need, replicas in sorted(demands, key=lambda d: (-d[1].get("gpu", 0), -len(d[1]))):
        for _ in range(replicas):
            pod = next((p for p in free if all(p.get(k, 0.0) >= v for k, v in need.items() if v)), None)
            if pod is None:
                errors.append(f"{describe(doc)}: no room for a {name} replica needing {need} at max_replicas "
                              f"({replicas}); worker groups offer {[res for res, _ in pods]} x pods")
                break
            for key, value in need.items():
                pod[key] = pod.get(key, 0.0) - value
    return errors


def train_entrypoint(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """(config name, --set overrides) of a RayJob running `taxonet train` (ValueError for any other command)."""
    argv = shlex.split(str((doc.get("spec") or {}).get("entrypoint", "")))
    if argv[:2] != ["taxonet", "train"]:
        raise ValueError(f"{describe(doc)}: entrypoint does not start with 'taxonet train': {argv[:3]}")
    config, overrides, rest = None, [], argv[2:]
    while rest:
        flag = rest.pop(0)
        if flag in ("--config", "--set") and not rest:
            raise ValueError(f"{describe(doc)}: {flag} without a value")
        if flag == "--config":
            config = rest.pop(0)
        elif flag == "--set":
            overrides.append(rest.pop(0))
        else:
            raise ValueError(f"{describe(doc)}: unexpected argument {flag!r} in the entrypoint")
    if not config:
        raise ValueError(f"{describe(doc)}: entrypoint has no --config")
    return config, overrides


def train_capacity_errors(doc: dict[str, Any], num_workers: int, use_gpu: bool, cpus_per_worker: float,
                          gpus_per_worker: float) -> list[str]:
    """The RayJob's worker groups can hold the Ray Train workers the entrypoint's run config asks for."""
    cluster = ray_cluster_spec(doc) or {}
    fits = 0
    for group in cluster.get("workerGroupSpecs") or []:
        res = container_resources(group.get("template") or {})
        per_pod = int(res["cpu"] // cpus_per_worker) if cpus_per_worker else 0
        if use_gpu:
            per_pod = min(per_pod, int(res["gpu"] // gpus_per_worker)) if gpus_per_worker else per_pod
        fits += per_pod * _group_count(cluster, group)
    errors = []
    if fits < num_workers:
        errors.append(f"{describe(doc)}: room for {fits} Ray Train workers ({cpus_per_worker:g} CPU"
                      f"{f', {gpus_per_worker:g} GPU' if use_gpu else ''} each), the entrypoint asks for {num_workers}")
    has_gpu_groups = any(container_resources(g.get("template") or {})["gpu"] for g in
                         cluster.get("workerGroupSpecs") or [])
    if has_gpu_groups != use_gpu:
        errors.append(f"{describe(doc)}: train.use_gpu={use_gpu} but GPU worker groups present={has_gpu_groups}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Memory: the object store in /dev/shm, read-only root filesystems, the resource budget

GIB = 2**30


def _volume(spec: dict[str, Any], mount_path: str, container: dict[str, Any]) -> dict[str, Any] | None:
    """The pod volume a container mounts at ``mount_path`` (None when nothing is mounted there)."""
    name = next((m.get("name") for m in container.get("volumeMounts") or [] if m.get("mountPath") == mount_path), None)
    return next((v for v in spec.get("volumes") or [] if v.get("name") == name), None) if name else None


def object_store_errors(doc: dict[str, Any]) -> list[str]:
    """Every Ray pod sets object-store-memory and mounts a memory-backed /dev/shm at least that large, within its
    memory limit; otherwise Ray (2.60) puts the object store on disk (default 30 % of memory outgrows /dev/shm)."""
    cluster = ray_cluster_spec(doc)
    if cluster is None:
        return []
    errors = []
    for group_name, group in ray_groups(cluster):
        at = f"{describe(doc)} group {group_name}"
        spec = (group.get("template") or {}).get("spec") or {}
        container = (spec.get("containers") or [{}])[0]
        store_text = (group.get("rayStartParams") or {}).get("object-store-memory")
        if store_text is None:
            errors.append(f"{at}: rayStartParams has no object-store-memory (Ray's default outgrows /dev/shm)")
            continue
        store = int(store_text)
        shm = _volume(spec, "/dev/shm", container)
        if not shm or (shm.get("emptyDir") or {}).get("medium") != "Memory":
            errors.append(f"{at}: no memory-backed emptyDir mounted at /dev/shm")
            continue
        size = parse_quantity((shm.get("emptyDir") or {}).get("sizeLimit", 0))
        if size < store:
            errors.append(f"{at}: /dev/shm sizeLimit {size / GIB:g} GiB < object-store-memory {store / GIB:g} GiB")
        limit = container_resources(group.get("template") or {})["memory"]
        if limit and size > limit:
            errors.append(f"{at}: /dev/shm ({size / GIB:g} GiB) larger than the memory limit ({limit / GIB:g} GiB)")
    return errors


def read_only_root_errors(doc: dict[str, Any]) -> list[str]:
    """Every container we write runs on a read-only root filesystem with a writable /tmp volume."""
    errors = []
    for where, template in pod_templates(doc):
        spec = template.get("spec") or {}
        for container in all_containers(template):
            at = f"{where} container {container.get('name')}"
            if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
                errors.append(f"{at}: readOnlyRootFilesystem is not true")
            if _volume(spec, "/tmp", container) is None:
                errors.append(f"{at}: no volume mounted at /tmp")
    return errors


def pod_requests(template: dict[str, Any]) -> tuple[float, float]:
    """(CPU, memory bytes) a pod requests: its containers together, or its largest init container if larger."""
    spec = template.get("spec") or {}

    def requests(container: dict[str, Any]) -> tuple[float, float]:
        values = (container.get("resources") or {}).get("requests") or {}
        return parse_quantity(values.get("cpu", 0)), parse_quantity(values.get("memory", 0))

    main = [requests(c) for c in spec.get("containers") or []]
    init = [requests(c) for c in spec.get("initContainers") or []]
    return (max([sum(c for c, _ in main)] + [c for c, _ in init]),
            max([sum(m for _, m in main)] + [m for _, m in init]))


def requested_resources(docs: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """(CPU, memory bytes) requested per pod source when everything runs at once, every Ray worker group at the
    most pods it can reach, plus the autoscaler sidecars."""
    totals: dict[str, tuple[float, float]] = {}
    for doc in docs:
        cluster = ray_cluster_spec(doc)
        if cluster is not None:
            for name, group in ray_groups(cluster):
                count = 1 if name == "head" else _group_count(cluster, group)
                cpu, memory = pod_requests(group.get("template") or {})
                totals[f"{describe(doc)} group {name} x{count}"] = (cpu * count, memory * count)
            submitter = (doc.get("spec") or {}).get("submitterPodTemplate")
            if submitter:
                totals[f"{describe(doc)} submitter"] = pod_requests(submitter)
            if cluster.get("enableInTreeAutoscaling"):
                sidecar = ((cluster.get("autoscalerOptions") or {}).get("resources") or {}).get("requests") or {}
                totals[f"{describe(doc)} autoscaler"] = (parse_quantity(sidecar.get("cpu", "500m")),
                                                        parse_quantity(sidecar.get("memory", "512Mi")))
        elif doc.get("kind") in ("Deployment", "StatefulSet", "Job"):
            if ((doc.get("metadata") or {}).get("annotations") or {}).get("helm.sh/hook") == "test":
                continue  # runs only during `helm test`
            count = int((doc.get("spec") or {}).get("replicas", 1))
            cpu, memory = pod_requests((doc.get("spec") or {}).get("template") or {})
            totals[describe(doc)] = (cpu * count, memory * count)
    return totals
