"""The review loop as packaged (issue 17): serving queues unsure crops, the review page runs next to the API from the
same image with the same Secrets and probes its /healthz, the unsure alert links the page, and one switch turns all
of it off: components/no-review for the kustomize overlays, review.enabled / review.page.enabled for the chart."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from k8s_support import (CHART_DIR, OVERLAYS, REPO_ROOT, HelmError, HelmRenderer, deep_merge, kustomize_build,
                         load_generator)

import k8s_checks as checks
from taxonet import registry
from taxonet.cli import build_parser
from taxonet.review.app import build_app
from taxonet.review.leases import Leases
from taxonet.review.store import ReviewStore
from taxonet.serve.config import ReviewQueueArgs
from taxonet.taxonomy import Taxonomy

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

TOKEN_ENV = "TAXONET_API_TOKEN"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
CHART_VALUES = {"default": None, "cpu-dev": CHART_DIR / "values-cpu-dev.yaml", "gpu": CHART_DIR / "values-gpu.yaml"}


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) <= 1, f"{len(found)} objects {kind}/{name}"
    return found[0] if found else None


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [checks.describe(d) for d in found]
    return found[0]


def serve_args(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return checks.parse_serve_config(one(docs, "RayService"))["applications"][0]["args"]


def unsure_alert(docs: list[dict[str, Any]]) -> dict[str, Any]:
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == "TaxonetUnsureRateRising")


def review_objects(docs: list[dict[str, Any]]) -> list[str]:
    return [checks.describe(d) for d in docs if d["metadata"]["name"].endswith("-review")
            or (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "review"]


def health_routes() -> set[str]:
    """Routes of the review app as the package builds it (no storage is touched)."""
    store = ReviewStore("/nonexistent/queue", "/nonexistent/labels", Taxonomy.demo())
    return {route.path for route in build_app(store, Leases(), ()).routes}


def check_review_page(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The review page Deployment/Service/NetworkPolicy `name` against the RayService beside it; returns the parsed
    `taxonet review serve` command line."""
    args = serve_args(docs)
    queue = ReviewQueueArgs.model_validate(args["review_queue"])
    assert queue.uri.startswith("s3://") and queue.uri.split("/")[2] == args["model"].split("/")[2], \
        "the queue is on the bucket the models are on"
    deployment = named(docs, "Deployment", name)
    assert deployment is not None, f"no Deployment {name}"
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, "one review server per queue"
    container = pod["containers"][0]
    command = container["command"]
    assert command[:3] == ["taxonet", "review", "serve"] and "args" not in container
    parsed = build_parser().parse_args(command[1:])
    assert (parsed.queue, parsed.model, parsed.host) == (queue.uri, args["model"], "0.0.0.0")
    assert parsed.labels.startswith("s3://") and parsed.labels != parsed.queue

    head = checks.ray_cluster_spec(one(docs, "RayService"))["headGroupSpec"]["template"]["spec"]
    ray = head["containers"][0]
    assert container["image"] == ray["image"] and container.get("imagePullPolicy") == ray.get("imagePullPolicy")
    assert container["envFrom"] == ray["envFrom"], "S3 credentials as the Serve pods get them"
    assert pod["serviceAccountName"] == head["serviceAccountName"] and pod["automountServiceAccountToken"] is False
    token = {e["name"]: e for e in container.get("env") or []}.get(TOKEN_ENV)
    api_token = {e["name"]: e for e in ray.get("env") or []}.get(TOKEN_ENV)
    assert (token is None) == (api_token is None), "the page is token-protected exactly when the API is"
    if token is not None:
        assert token == api_token and set(token) == {"name", "valueFrom"}, "the API's Secret, never a literal"
    assert not [word for word in command if "token" in word.lower()], "no token on the command line"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": parsed.port}
    assert "/healthz" in health_routes()
    for probe in PROBES:
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in deployment["spec"]["selector"]["matchLabels"].items())

    service = named(docs, "Service", name)
    assert service is not None and all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(parsed.port, "http")]
    policy = named(docs, "NetworkPolicy", name)
    assert policy is not None
    assert all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    assert parsed.port in {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}

    wait = pod["initContainers"][0]
    reference = registry.parse_reference(parsed.model)
    assert wait["args"][1:] == [registry.alias_uri(reference.models, reference.name, reference.alias)]
    job = [d for d in docs if d["kind"] == "RayJob"]
    if job:
        assert wait["args"][0] == job[0]["spec"]["submitterPodTemplate"]["spec"]["initContainers"][0]["args"][0]
    compile(wait["args"][0], "wait-for-model", "exec")
    assert wait["envFrom"] == container["envFrom"] and TOKEN_ENV not in {e["name"] for e in wait.get("env") or []}
    return vars(parsed)


def without_review(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`docs` with the review page, the queue and the alert's link taken out by hand."""
    kept = [copy.deepcopy(d) for d in docs if checks.describe(d) not in review_objects(docs)]
    service = one(kept, "RayService")
    config = checks.parse_serve_config(service)
    del config["applications"][0]["args"]["review_queue"]
    service["spec"]["serveConfigV2"] = config
    del unsure_alert(kept)["annotations"]["review_url"]
    return kept


def comparable(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [copy.deepcopy(d) for d in docs]
    service = one(out, "RayService")
    if isinstance(service["spec"]["serveConfigV2"], str):
        service["spec"]["serveConfigV2"] = checks.parse_serve_config(service)
    return sorted(out, key=checks.describe)


def assert_valid(docs: list[dict[str, Any]], schemas_dir: Path) -> None:
    problems = [e for doc in docs for e in checks.schema_errors(doc, schemas_dir)]
    problems += [f"{checks.describe(doc)}{path}: null" for doc in docs for path in checks.find_nulls(doc)]
    problems += [e for doc in docs for e in checks.security_errors(doc) + checks.read_only_root_errors(doc)]
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------------------------------------
# kustomize

@pytest.fixture(scope="module")
def overlay_docs(rendered_overlays: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {name: checks.load_documents(text) for name, text in rendered_overlays.items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_queue_unsure_crops_and_deploy_the_review_page(overlay: str, overlay_docs, schemas_dir) -> None:
    generator = load_generator()
    docs = overlay_docs[overlay]
    page = check_review_page(docs, "taxonet-review")
    assert serve_args(docs)["review_queue"] == {"uri": generator.REVIEW_QUEUE_URI}
    assert page["labels"] == generator.REVIEW_LABELS_URI
    assert_valid(docs, schemas_dir)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_alert_links_the_port_forwarded_page(overlay: str, overlay_docs) -> None:
    generator = load_generator()
    docs = overlay_docs[overlay]
    link = unsure_alert(docs)["annotations"]["review_url"]
    assert link == "http://127.0.0.1:8300/?unsure_at={{ $labels.rank }}" == generator.review_link(
        generator.REVIEW_PAGE_URL)
    service = named(docs, "Service", "taxonet-review")
    assert f":{service['spec']['ports'][0]['port']}/" in link, "the address `kubectl port-forward svc/...` opens"
    assert generator.review_link("https://r.example.org/?x=1") == \
        "https://r.example.org/?x=1&unsure_at={{ $labels.rank }}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_review_component_turns_the_loop_off(overlay: str, k8s_tree: Path, overlay_docs, schemas_dir) -> None:
    """On top of a packaged overlay: no page, no queue, no link, and nothing else changed."""
    mine = k8s_tree / "overlays" / f"{overlay}-no-review"
    mine.mkdir(exist_ok=True)
    (mine / "kustomization.yaml").write_text(
        f"resources: [../{overlay}]\ncomponents: [../../components/no-review]\n", encoding="utf-8")
    off = checks.load_documents(kustomize_build(mine))
    assert not review_objects(off)
    assert "review_queue" not in serve_args(off) and "review_url" not in unsure_alert(off)["annotations"]
    assert comparable(off) == comparable(without_review(overlay_docs[overlay]))
    assert_valid(off, schemas_dir)


def test_no_review_component_inside_the_gpu_overlay(k8s_tree: Path, overlay_docs) -> None:
    """Listed in overlays/gpu's own `components:` it does the same as on top of it."""
    mine = k8s_tree / "overlays" / "gpu-own-components"
    if not mine.exists():
        shutil.copytree(k8s_tree / "overlays" / "gpu", mine)
        with (mine / "kustomization.yaml").open("a", encoding="utf-8") as handle:
            handle.write("\ncomponents: [../../components/no-review]\n")
    off = checks.load_documents(kustomize_build(mine))
    assert comparable(off) == comparable(without_review(overlay_docs["gpu"]))


def test_no_review_rule_patch_refuses_a_moved_rule(k8s_tree: Path, tmp_path: Path) -> None:
    """The component's generated JSON patch checks which rule it edits: a reordered rule list is an error."""
    patch = yaml.safe_load((REPO_ROOT / "k8s" / "components" / "no-review" / "rule-patch.yaml").read_text())
    assert patch[0]["op"] == "test" and patch[0]["value"] == "TaxonetUnsureRateRising"
    index = int(patch[0]["path"].split("/")[5])
    rules = load_generator().build_rule_groups()[0]["rules"]
    assert rules[index]["alert"] == "TaxonetUnsureRateRising"
    broken = tmp_path / "k8s"
    shutil.copytree(k8s_tree, broken)
    rule_file = broken / "base" / "prometheusrule.yaml"
    rule = yaml.safe_load(rule_file.read_text())
    rule["spec"]["groups"][0]["rules"].insert(0, {"record": "x:y", "expr": "vector(1)"})
    rule_file.write_text(yaml.safe_dump(rule), encoding="utf-8")
    (broken / "overlays" / "off").mkdir()
    (broken / "overlays" / "off" / "kustomization.yaml").write_text(
        "resources: [../gpu]\ncomponents: [../../components/no-review]\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="test"):
        kustomize_build(broken / "overlays" / "off")


# -------------------------------------------------------------------------------------------------------------
# Helm

def chart_docs(helm: HelmRenderer, values: dict[str, Any] | None = None, base: str = "default") -> list[dict[str, Any]]:
    merged: dict[str, Any] = {}
    if CHART_VALUES[base] is not None:
        merged = helm.values_from_yaml(CHART_VALUES[base].read_text(encoding="utf-8"))
    files = helm.template(deep_merge(merged, values or {}))
    text = "\n---\n".join(t for name, t in sorted(files.items()) if not name.endswith("NOTES.txt"))
    return checks.load_documents(text)


@pytest.mark.parametrize("base", sorted(CHART_VALUES))
def test_chart_queues_unsure_crops_and_deploys_the_review_page(base: str, helm: HelmRenderer, chart_values,
                                                               schemas_dir) -> None:
    docs = chart_docs(helm, base=base)
    page = check_review_page(docs, "taxonet-review")
    assert serve_args(docs)["review_queue"] == chart_values["serve"]["args"]["review_queue"]
    assert page["labels"] == chart_values["review"]["labels"]
    assert_valid(docs, schemas_dir)
    link = unsure_alert(docs)["annotations"]["review_url"]
    if base == "gpu":  # values-gpu.yaml names its Ingress host
        assert link == "https://review.example.com/taxonet?unsure_at={{ $labels.rank }}"
    else:
        assert link == load_generator().review_link(load_generator().REVIEW_PAGE_URL)


def test_chart_defaults_equal_the_kustomize_review_page(helm: HelmRenderer, overlay_docs) -> None:
    chart = named(chart_docs(helm), "Deployment", "taxonet-review")["spec"]["template"]["spec"]
    overlay = named(overlay_docs["gpu"], "Deployment", "taxonet-review")["spec"]["template"]["spec"]
    for key in ("command", "ports", "resources", "securityContext", *PROBES):
        assert chart["containers"][0][key] == overlay["containers"][0][key], key
    assert [a.strip() for a in chart["initContainers"][0]["args"]] == \
        [a.strip() for a in overlay["initContainers"][0]["args"]]
    assert chart["securityContext"] == overlay["securityContext"]


def test_chart_review_switches(helm: HelmRenderer, schemas_dir) -> None:
    generator = load_generator()
    on = chart_docs(helm)
    off = chart_docs(helm, {"review": {"enabled": False}})
    assert not review_objects(off)
    assert "review_queue" not in serve_args(off) and "review_url" not in unsure_alert(off)["annotations"]
    assert comparable(off) == comparable(without_review(on))
    assert_valid(off, schemas_dir)
    page_off = chart_docs(helm, {"review": {"page": {"enabled": False}}})
    assert not review_objects(page_off), "the page alone can be left out ..."
    assert serve_args(page_off)["review_queue"] == serve_args(on)["review_queue"], "... the queue stays on"
    assert "review_url" not in unsure_alert(page_off)["annotations"], "no page deployed, no default link"
    linked = chart_docs(helm, {"review": {"page": {"enabled": False}},
                               "monitoring": {"prometheusRule": {"reviewUrl": "https://review.example.org/"}}})
    assert unsure_alert(linked)["annotations"]["review_url"] == generator.review_link("https://review.example.org/")
    stopped = chart_docs(helm, {"review": {"page": {"replicas": 0}}})
    assert named(stopped, "Deployment", "taxonet-review")["spec"]["replicas"] == 0
    assert named(stopped, "Service", "taxonet-review") is not None
    custom = chart_docs(helm, {"review": {"labels": "s3://lab/labels", "page": {"model": "s3://lab/models/m@staging",
                                                                                "image": {"tag": "dev"}}},
                               "serve": {"args": {"review_queue": {"uri": "s3://lab/queue", "audit_rate": 0.05}}},
                               "networkPolicy": {"reviewFrom": [{"podSelector": {"matchLabels": {"app": "gw"}}}]}})
    deployment = named(custom, "Deployment", "taxonet-review")["spec"]["template"]["spec"]
    assert deployment["containers"][0]["command"][3:8] == ["s3://lab/queue", "--labels", "s3://lab/labels",
                                                          "--model", "s3://lab/models/m@staging"]
    assert deployment["initContainers"][0]["args"][1] == "s3://lab/models/m/aliases/staging.json"
    assert deployment["containers"][0]["image"] == "registry.example.com/taxonet:dev"
    assert serve_args(custom)["review_queue"] == {"uri": "s3://lab/queue", "audit_rate": 0.05}
    rule = named(custom, "NetworkPolicy", "taxonet-review")["spec"]["ingress"][0]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app": "gw"}}}]
    checkpoint = chart_docs(helm, {"review": {"page": {"model": "s3://lab/runs/x/best"}}})
    assert "initContainers" not in named(checkpoint, "Deployment", "taxonet-review")["spec"]["template"]["spec"], \
        "a checkpoint URI is not waited for"
    with pytest.raises(HelmError, match="serve.args.review_queue.uri"):
        helm.template({"serve": {"args": {"review_queue": None}}})


def test_chart_page_needs_the_token_like_the_api(helm: HelmRenderer) -> None:
    no_token = {"serve": {"apiToken": {"existingSecret": ""}}}
    with pytest.raises(HelmError, match="serve.apiToken: the API needs a token"):
        helm.template(no_token)
    with pytest.raises(HelmError, match="serve.apiToken: the API needs a token"):
        helm.template({**no_token, "serve": {**no_token["serve"], "enabled": False}, "train": {"enabled": False}})
    open_docs = chart_docs(helm, {"serve": {"auth": "none", "apiToken": {"existingSecret": ""}}})
    container = named(open_docs, "Deployment", "taxonet-review")["spec"]["template"]["spec"]["containers"][0]
    assert TOKEN_ENV not in {e["name"] for e in container.get("env") or []}
    made = chart_docs(helm, {"serve": {"apiToken": {"existingSecret": "", "value": "t0ken-a,t0ken-b"}}})
    page = named(made, "Deployment", "taxonet-review")
    assert "t0ken" not in yaml.safe_dump(page), "the token reaches the page through the Secret only"
    env = {e["name"]: e for e in page["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]["name"] == "taxonet-api-token"
    assert named(made, "Secret", "taxonet-api-token") is not None


def test_chart_notes_say_how_to_reach_the_page(helm: HelmRenderer) -> None:
    notes = "".join(t for name, t in helm.template().items() if name.endswith("NOTES.txt"))
    if notes:  # the helm binary's `template` does not render NOTES.txt
        assert "port-forward svc/taxonet-review 8300:8300" in notes and "s3://taxonet/review/queue" in notes
    off = "".join(t for name, t in helm.template({"review": {"enabled": False}}).items() if name.endswith("NOTES.txt"))
    assert "taxonet-review" not in off and "review/queue" not in off


BAD_REVIEW_VALUES = {
    "two review servers (leases in memory)": ({"review": {"page": {"replicas": 2}}}, "replicas"),
    "labels on GCS": ({"review": {"labels": "gs://b/labels"}}, "labels"),
    "queue typo": ({"serve": {"args": {"review_queue": {"uri": "s3://taxonet/q", "audit": 0.1}}}}, "audit"),
    "audit share over 1": ({"serve": {"args": {"review_queue": {"uri": "s3://taxonet/q", "audit_rate": 2}}}},
                           "audit_rate"),
    "queue on no storage": ({"serve": {"args": {"review_queue": {"uri": ""}}}}, "uri"),
    "page model on GCS": ({"review": {"page": {"model": "gs://b/m@production"}}}, "model"),
    "unknown page key": ({"review": {"page": {"replica": 1}}}, "replica"),
    "service type typo": ({"review": {"page": {"service": {"type": "Ingress"}}}}, "type"),
}


@pytest.mark.parametrize("case", sorted(BAD_REVIEW_VALUES))
def test_schema_rejects_bad_review_values(case: str, chart_values, chart_schema) -> None:
    override, mentioned = BAD_REVIEW_VALUES[case]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(chart_schema).iter_errors(deep_merge(chart_values, override))]
    assert errors and any(mentioned in e for e in errors), (case, errors)


def test_schema_review_queue_has_the_package_fields(chart_schema) -> None:
    queue = chart_schema["properties"]["serve"]["properties"]["args"]["properties"]["review_queue"]
    assert set(queue["properties"]) == set(ReviewQueueArgs.model_fields)
    assert queue["required"] == [n for n, f in ReviewQueueArgs.model_fields.items() if f.is_required()]


# -------------------------------------------------------------------------------------------------------------
# docs

def test_docs_say_how_the_page_is_deployed_reached_and_turned_off() -> None:
    review = (REPO_ROOT / "docs" / "review.md").read_text(encoding="utf-8")
    deploy = (REPO_ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for text in (review, deploy):
        for needed in ("port-forward svc/taxonet-review 8300:8300", "components/no-review", "review.enabled=false",
                       "review.page.enabled"):
            assert needed in text, needed
    assert "Ingress" in review and "/healthz" in review
