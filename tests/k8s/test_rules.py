"""The alerting rules: valid for `promtool check rules`, and `promtool test rules` unit tests with synthetic series
pass for the rules as shipped (kustomize base and chart defaults) and fail when a threshold changes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_support import REPO_ROOT, HelmRenderer, kustomize_build, load_generator, require_tool

import k8s_checks as checks

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

RULE_TESTS = Path(__file__).parent / "rules"
#: every alert the rules define, each with a runbook entry in docs/metrics.md
ALERTS = {"TaxonetHighErrorRatio", "TaxonetHighLatencyP99", "TaxonetNoReadyModel", "TaxonetModelLoadFailed",
          "TaxonetUnsureRateRising"}
#: metric names the rules read (exported by Ray with the `ray_` prefix); the model lifecycle ones are contract names
METRICS = {"ray_taxonet_requests_total", "ray_taxonet_stage_latency_seconds_bucket", "ray_taxonet_predictions_total",
           "ray_taxonet_unsure_total", "ray_taxonet_model_ready", "ray_taxonet_model_load_failures_total",
           "ray_taxonet_model_info"}


def promtool() -> str:
    return require_tool("promtool", "Debian's `prometheus` package ships it: `make system-deps`")


def write_rules(directory: Path, groups: list[dict]) -> Path:
    """The groups as a Prometheus rule file, next to copies of the unit-test files that name it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "taxonet.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    for test in RULE_TESTS.glob("*.test.yaml"):
        shutil.copy(test, directory / test.name)
    return path


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=150)


@pytest.fixture(scope="module")
def shipped_groups(rendered_overlays: dict[str, str]) -> dict[str, list[dict]]:
    """The rule groups as the gpu overlay, the cpu-dev overlay and the chart (defaults) ship them."""
    helm = HelmRenderer()
    chart = checks.load_documents(helm.template()["taxonet/templates/prometheusrule.yaml"])
    groups = {name: next(d for d in checks.load_documents(text) if d["kind"] == "PrometheusRule")["spec"]["groups"]
              for name, text in rendered_overlays.items()}
    groups["chart"] = chart[0]["spec"]["groups"]
    return groups


def test_every_shipped_rule_file_passes_promtool_check(shipped_groups, tmp_path: Path) -> None:
    for name, groups in shipped_groups.items():
        path = write_rules(tmp_path / name, groups)
        result = run_promtool("check", "rules", path.name, cwd=path.parent)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout


def test_rules_cover_every_alert_and_metric(shipped_groups) -> None:
    groups = shipped_groups["gpu"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    exprs = "\n".join(r["expr"] for g in groups for r in g["rules"])
    for metric in METRICS:
        assert metric in exprs, metric
    runbook = (REPO_ROOT / "docs" / "metrics.md").read_text(encoding="utf-8").split("## Alert runbooks", 1)
    assert len(runbook) == 2, "docs/metrics.md has an 'Alert runbooks' section"
    for alert in ALERTS:
        assert f"### {alert}" in runbook[1], f"no runbook entry for {alert}"
    assert shipped_groups["chart"] == groups, "chart defaults and the kustomize base ship the same rules"


def test_promtool_unit_tests_pass_on_the_shipped_rules(shipped_groups, tmp_path: Path) -> None:
    directory = tmp_path / "shipped"
    write_rules(directory, shipped_groups["gpu"])
    tests = sorted(p.name for p in directory.glob("*.test.yaml"))
    assert tests == ["taxonet-rules.test.yaml", "taxonet-unsure.test.yaml"]
    result = run_promtool("test", "rules", *tests, cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2


def test_promtool_unit_tests_fail_when_a_threshold_moves(tmp_path: Path) -> None:
    """The unit tests see the thresholds: an error-ratio SLO of 10 % no longer fires on 4.8 % errors."""
    generator = load_generator()
    directory = tmp_path / "loose"
    write_rules(directory, generator.render_rule_groups(generator.AlertSettings(error_ratio=0.1)))
    result = run_promtool("test", "rules", "taxonet-rules.test.yaml", cwd=directory)
    assert result.returncode != 0 and "TaxonetHighErrorRatio" in result.stderr, result.stdout + result.stderr


def test_promtool_unit_tests_check_the_review_link(tmp_path: Path) -> None:
    """The unsure alert's link to the review page is part of its unit test: rules without it fail."""
    generator = load_generator()
    directory = tmp_path / "unlinked"
    write_rules(directory, generator.render_rule_groups(generator.AlertSettings(review_url="")))
    result = run_promtool("test", "rules", "taxonet-unsure.test.yaml", cwd=directory)
    assert result.returncode != 0 and "review_url" in result.stdout + result.stderr, result.stdout + result.stderr


def test_broken_rules_fail_promtool_check(tmp_path: Path) -> None:
    groups = load_generator().render_rule_groups(load_generator().AlertSettings())
    first_alert = next(rule for rule in groups[0]["rules"] if "alert" in rule)
    first_alert["expr"] = "taxonet:classify_error_ratio:rate5m > > 0.01"
    path = write_rules(tmp_path, groups)
    assert run_promtool("check", "rules", path.name, cwd=tmp_path).returncode != 0
