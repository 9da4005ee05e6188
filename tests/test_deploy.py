"""The deployment artefacts stay valid: alert rules (promtool), the Grafana dashboard (JSON,
and every metric it queries exists), the sidecar gateway.toml (loads)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from gateway.config import load_settings
from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def _metric_names() -> set[str]:
    names: set[str] = set()
    for metric in Metrics().registry.collect():
        names.add(metric.name)
        names.update(sample.name for sample in metric.samples)
        names.update(f"{metric.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: make test installs the Debian package prometheus"
    result = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_query_only_metrics_the_gateway_has() -> None:
    known = _metric_names()
    dashboard = (DEPLOY / "grafana" / "gateway-dashboard.json").read_text()
    json.loads(dashboard)
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = set(re.findall(r"\bgateway_[a-z_]+", dashboard + alerts))
    assert used, "no gateway metric referenced"
    assert used <= known, sorted(used - known)


def test_sidecar_settings_load() -> None:
    settings = load_settings(DEPLOY / "kubernetes" / "gateway.toml")
    assert settings.store.url.startswith(("redis://", "rediss://"))
