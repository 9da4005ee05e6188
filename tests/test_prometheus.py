"""A real Prometheus scrapes a running gateway and evaluates every query of the Grafana
dashboard and every alert rule through its HTTP API: a query error anywhere, or a dashboard
panel query that returns no series, fails the test. The traffic is allowed, blocked,
classic, public and unlicensed requests, and those of a rollout: an app in shadow mode, a
request no route matched, and a candidate matrix decided alongside. Prometheus is the
Debian package ``prometheus`` (``make test`` installs it); missing, the test fails, it does
not skip.

Grafana's variables are replaced as Grafana would: query variables by what their own
``label_values()`` query returns from this Prometheus (the first value, or the variable's
``allValue`` where "All" is selected), custom ones by their current value, and the
built-in intervals by fixed windows that cover the whole test."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import IssueKey
from tests.harness import (
    Gateway,
    free_port,
    running_gateway,
    stop_process,
    write_candidate_matrix,
)

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "gateway-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
JOB = "entitlement-gateway"
# Fixed windows for Grafana's built-ins: wide enough to hold every scrape of this test.
BUILTINS = {"__rate_interval": "30s", "__interval": "5s", "__range": "1m"}
DEADLINE = 20.0  # seconds to wait for Prometheus to see something: a bound, not a timing
OPTIMIZE = "/api/v1/shipments/1/optimize"  # a Fleet feature


class Prometheus:
    """``/usr/bin/prometheus`` on a free loopback port, scraping the gateway every second."""

    def __init__(self, folder: Path, admin_port: int) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: make test installs the Debian package prometheus"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        # namespace, as the Kubernetes scrape configs add it
                        {"targets": [f"127.0.0.1:{admin_port}"], "labels": {"namespace": "test"}}
                    ],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        stop_process(self.process)

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """The ``data`` of a successful API answer; an error answer fails the test."""
        body = await self._get(session, path, params)
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def evaluate(
        self, session: aiohttp.ClientSession, expr: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        """(series, None) or ([], the error Prometheus gave)."""
        body = await self._get(session, "query", {"query": expr})
        if body["status"] != "success":
            return [], f"{body.get('errorType')}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result, None

    async def query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        result, error = await self.evaluate(session, expr)
        assert error is None, (expr, error)
        return result

    async def _get(
        self, session: aiohttp.ClientSession, path: str, params: dict[str, str]
    ) -> dict[str, Any]:
        async with session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def wait_for(self, session: aiohttp.ClientSession, expr: str) -> None:
        """Until ``expr`` returns a series (scrapes and rule evaluations take a second)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while not await self.query(session, expr):
            assert self.process.poll() is None, self.log.read_text()
            assert loop.time() < deadline, f"Prometheus never saw {expr}\n{self.log.read_text()}"
            await asyncio.sleep(0.2)

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                async with session.get(f"{self.url}/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert loop.time() < deadline, self.log.read_text()
            await asyncio.sleep(0.1)


@pytest.fixture
async def scraped(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int]
) -> AsyncIterator[tuple[Gateway, Prometheus]]:
    folder = tmp_path / "gateway"
    folder.mkdir()
    # Rolling out, too: the Client Portal in shadow mode, and a candidate matrix (Basic
    # Shipment Optimization in Core) decided alongside, so the rollout panels have traffic.
    write_candidate_matrix(folder)
    async with running_gateway(
        folder,
        key_dir,
        upstream_ports,
        app_extra={"client_portal": 'enforce = "shadow"\n'},
        extra='[candidate]\ntier_matrix = "tier_matrix.next.toml"\n',
    ) as gateway:
        prometheus = Prometheus(tmp_path, gateway.admin)
        try:
            yield gateway, prometheus
        finally:
            prometheus.stop()


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel.get("title", "?"), target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


async def grafana_variables(session: aiohttp.ClientSession, prom: Prometheus) -> dict[str, str]:
    """Each variable's value, resolved in order (a later query may use an earlier one)."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = dict(BUILTINS)
    for variable in dashboard["templating"]["list"]:
        kind, name = variable["type"], variable["name"]
        if kind == "datasource":
            continue
        if kind == "custom":
            values[name] = variable["current"]["value"]
            continue
        assert kind == "query", f"variable ${name}: type {kind} is not handled here"
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert found, f"variable ${name}: {variable['definition']}"
        selector, label = substitute(found.group(1), values), found.group(2)
        series = await prom.api(session, "series", **{"match[]": selector})
        options = sorted({s[label] for s in series if label in s})
        assert options, f"variable ${name}: {variable['definition']} finds no value"
        selects_all = variable.get("includeAll") and variable["current"].get("value") == ["$__all"]
        values[name] = variable["allValue"] if selects_all else options[0]
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown Grafana variable ${name} in {expr}"
        return values[name]

    done = re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)
    return done


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


async def test_every_dashboard_and_alert_query_evaluates_on_a_scraped_gateway(
    scraped: tuple[Gateway, Prometheus], client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    gateway, prom = scraped
    await prom.wait_ready(client)
    await prom.wait_for(client, f'up{{job="{JOB}"}} == 1')

    fleet = {"X-License-Key": issue_key(tier="fleet", sub="tenant-fleet")}
    core = {"X-License-Key": issue_key(tier="core", sub="tenant-core")}
    traffic = [
        ("operations", OPTIMIZE, fleet, 200),  # allowed
        ("operations", OPTIMIZE, core, 403),  # blocked: a Fleet feature; candidate: allowed
        ("operations", "/api/v1/shipments", core, 200),  # allowed, license from the cache
        ("operations", "/xdispatch/jobs", {}, 200),  # classic
        ("driver_app", "/xdispatch/jobs", {}, 200),
        ("client_portal", "/api/v1/health", {}, 200),  # public
        ("operations", "/api/v1/shipments", {}, 401),  # unlicensed
        ("client_portal", "/api/v1/routes", core, 200),  # shadow_blocked: a Fleet feature
        ("operations", "/api/v9/widgets/12345", core, 200),  # unmatched_allowed
    ]
    for app, path, headers, status in traffic * 3:
        method = "POST" if path == OPTIMIZE else "GET"
        async with client.request(method, gateway.url(app, path), headers=headers) as response:
            await response.read()
            assert response.status == status, (app, path)
    outcomes = ["allowed", "blocked", "classic", "public", "unlicensed"]
    for outcome in [*outcomes, "shadow_blocked", "unmatched_allowed"]:
        await prom.wait_for(client, f'rate(gateway_requests_total{{outcome="{outcome}"}}[30s]) > 0')
    await prom.wait_for(client, "rate(gateway_candidate_diff_total[30s]) > 0")
    await prom.wait_for(client, "rate(gateway_shadow_block_total[30s]) > 0")

    problems: list[str] = []
    values = await grafana_variables(client, prom)
    queries = dashboard_queries()
    assert len(queries) >= 15, "the dashboard lost its panels?"
    for title, expr in queries:
        query = substitute(expr, values)
        series, error = await prom.evaluate(client, query)
        if error or not series:
            problems.append(f"dashboard panel {title!r}: {error or 'no series'} for {query}")

    # The rule expressions through the query API, and the same rules as Prometheus itself
    # loaded and evaluated them.
    alerts = alert_expressions()
    for name, expr in alerts:
        _, error = await prom.evaluate(client, expr)
        if error:
            problems.append(f"alert {name}: {error}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        groups = (await prom.api(client, "rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        assert loop.time() < deadline, "the alert rules were never evaluated"
        await asyncio.sleep(0.2)
    assert sorted(rule["name"] for rule in rules) == sorted(name for name, _ in alerts)
    for rule in rules:
        if rule["health"] != "ok":
            problems.append(f"alert {rule['name']}: {rule['health']} {rule.get('lastError')}")
    # The healthy, scraped gateway is found by the job the `up` alerts expect.
    assert not await prom.query(client, f'absent(up{{job="{JOB}"}})')
    assert not problems, "\n".join(problems)
