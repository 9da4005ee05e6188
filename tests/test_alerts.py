"""The alert rules behave as their runbooks say: ``promtool test rules`` runs
deploy/prometheus/alerts.test.yml, in which every alert has a case where it fires and one
where it must not; every runbook_url is absolute and lands on a heading of
docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus"


def _alerts() -> list[dict[str, Any]]:
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def test_alert_unit_tests_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: make test installs the Debian package prometheus"
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    unit_tests = yaml.safe_load((RULES / "alerts.test.yml").read_text())
    assert unit_tests["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in unit_tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert names - fires == set(), "alerts with no case where they fire"
    assert names - quiet == set(), "alerts with no case where they stay quiet"
    assert (fires | quiet) - names == set(), "cases for alerts that do not exist"


def _anchor(heading: str) -> str:
    """The anchor GitHub and GitLab give a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_runbook_urls_are_absolute_and_land_on_an_operations_heading() -> None:
    operations = (REPO / "docs" / "operations.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", operations, re.M)}
    bases = set()
    for alert in _alerts():
        url = alert["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base.startswith("https://") and base.endswith("/docs/operations.md"), url
        assert anchor == alert["alert"].lower() and anchor in anchors, url
        bases.add(base)
    assert len(bases) == 1, "one base for every runbook_url (the kustomization replaces it)"
