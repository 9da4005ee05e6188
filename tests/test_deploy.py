"""The deployment artefacts stay valid: alert rules (promtool), the Grafana dashboard (JSON,
and every metric it queries exists), the sidecar gateway.toml (loads), the Prometheus
Operator objects (generated from the rule file, rendered by kustomize with absolute
runbook URLs), and the image's constraints file (the tested versions of every dependency)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.config import load_settings
from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
MONITORING = DEPLOY / "kubernetes" / "monitoring"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
JOB = "entitlement-gateway"  # the scrape job the `up` alerts and the dashboard expect


def _metric_names() -> set[str]:
    names: set[str] = set()
    for metric in Metrics().registry.collect():
        names.add(metric.name)
        names.update(sample.name for sample in metric.samples)
        names.update(f"{metric.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: {package}"
    return found


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = _tool("kubectl", "kubectl (with kustomize v5) comes with the machine image")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def test_alert_rules_pass_promtool() -> None:
    promtool = _tool("promtool", "make test installs the Debian package prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_query_only_metrics_the_gateway_has() -> None:
    known = _metric_names()
    dashboard = (DEPLOY / "grafana" / "gateway-dashboard.json").read_text()
    json.loads(dashboard)
    alerts = ALERTS.read_text()
    used = set(re.findall(r"\bgateway_[a-z_]+", dashboard + alerts))
    assert used, "no gateway metric referenced"
    assert used <= known, sorted(used - known)


def test_sidecar_settings_load() -> None:
    settings = load_settings(DEPLOY / "kubernetes" / "gateway.toml")
    assert settings.store.url.startswith(("redis://", "rediss://"))


# --------------------------------------------------------------------------- Prometheus Operator


def test_prometheusrule_is_the_rule_file() -> None:
    checked = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prometheusrule"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    rule = _yaml(MONITORING / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == _yaml(ALERTS)["groups"]


def _runbook_urls(objects: list[dict[str, Any]]) -> dict[str, str]:
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    return {
        r["alert"]: r["annotations"]["runbook_url"]
        for group in rule["spec"]["groups"]
        for r in group["rules"]
    }


def test_monitoring_kustomization_renders_runbook_urls_from_its_base(tmp_path: Path) -> None:
    alerts = [r["alert"] for g in _yaml(ALERTS)["groups"] for r in g["rules"]]
    objects = _kustomize(MONITORING)
    # the settings ConfigMap is local-config: not applied to the cluster
    assert sorted(o["kind"] for o in objects) == ["PodMonitor", "PrometheusRule"]
    settings = _yaml(MONITORING / "kustomization.yaml")["configMapGenerator"][0]["literals"]
    (base,) = [s.split("=", 1)[1] for s in settings if s.startswith("runbook_base_url=")]
    assert base.startswith("https://")
    assert _runbook_urls(objects) == {a: f"{base}#{a.lower()}" for a in alerts}

    copy = tmp_path / "monitoring"
    shutil.copytree(MONITORING, copy)
    kustomization = copy / "kustomization.yaml"
    kustomization.write_text(
        kustomization.read_text().replace(base, "https://wiki.example.org/sre/gateway")
    )
    assert _runbook_urls(_kustomize(copy)) == {
        a: f"https://wiki.example.org/sre/gateway#{a.lower()}" for a in alerts
    }


def test_podmonitor_scrapes_the_sidecars_admin_port_as_the_alerts_job() -> None:
    monitor = _yaml(MONITORING / "podmonitor.yaml")
    deployment = _yaml(DEPLOY / "kubernetes" / "deployment.yaml")
    pod = deployment["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (gateway,) = [c for c in pod["spec"]["containers"] if c["name"] == "gateway"]
    assert endpoint["port"] in {p["name"] for p in gateway["ports"]}
    assert endpoint["path"] == "/metrics"
    relabel = {r["action"]: r for r in endpoint["relabelings"]}
    assert relabel["keep"]["sourceLabels"] == ["__meta_kubernetes_pod_container_name"]
    assert relabel["keep"]["regex"] == gateway["name"]
    assert relabel["replace"] == {"targetLabel": "job", "replacement": JOB, "action": "replace"}
    assert f'job="{JOB}"' in ALERTS.read_text()


# --------------------------------------------------------------------------- constraints


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_within_its_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pins = _pins()
    for line in declared:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt: run make constraints"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}"
        )


def test_the_tested_environment_is_the_constrained_one() -> None:
    """The versions these tests run with are the ones the image installs."""
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in distributions()
        if canonicalize_name(d.metadata["Name"])
        not in {"entitlement-gateway", "pip", "setuptools", "wheel", "distribute"}
    }
    assert installed == _pins(), (
        "the test environment differs from constraints.txt: `make .venv/.installed` installs "
        "the constrained versions; after a deliberate upgrade, run make constraints"
    )


def test_dockerfile_installs_the_constrained_versions() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^COPY [^\n]*\bconstraints\.txt\b", dockerfile, re.M)
    assert re.search(r"^RUN pip install -c constraints\.txt \.", dockerfile, re.M)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!constraints.txt" in ignore
