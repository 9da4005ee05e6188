"""The admin listener's ``/metrics``, ``/healthz`` and ``/readyz`` after real traffic
through a real gateway (README, Metrics): every metric name, counts by outcome, no tenant
ids, build info and process metrics, and an exposition that ``promtool check metrics``
accepts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import aiohttp
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.matrix import APP_NAMES
from gateway.metrics import Metrics, WorkerProcessesCollector
from tests.conftest import IssueKey
from tests.harness import EchoUpstream, Gateway, free_port, running_gateway

METRIC_NAMES = (
    "gateway_requests_total",
    "gateway_feature_block_total",
    "gateway_classic_passthrough_total",
    "gateway_license_checks_total",
    "gateway_license_cache_total",
    "gateway_request_duration_seconds",
    "gateway_decision_duration_seconds",
    "gateway_upstream_errors_total",
    "gateway_config_reloads_total",
    "gateway_config_info",
    "gateway_events_dropped_total",
    "gateway_store_errors_total",
    "gateway_build_info",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
)
OUTCOMES = ("allowed", "blocked", "classic", "public", "unlicensed", "rejected", "upstream_error")
CLASSIC_KEY = "ABCDE-12345-FGHIJ-67890-KLMNO"
OPTIMIZE = "/api/v1/shipments/1/optimize"


# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- helpers

Labels = tuple[tuple[str, str], ...]


def parse(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name → {sorted label pairs → value}."""
    found: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(parsed: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    return parsed.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def metrics_text(client: aiohttp.ClientSession, gateway: Gateway) -> str:
    async with client.get(gateway.admin_url("/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


async def raw_status(port: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def promtool_check(text: str) -> None:
    """``promtool check metrics`` must accept the exposition; a missing promtool is a
    failure, not a skip (the Debian package ``prometheus`` provides it)."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool not found on PATH: install the prometheus package"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


# --------------------------------------------------------------------------- /metrics


async def test_metrics_after_mixed_traffic(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    tenants = {
        "fleet": "tenant-fleet-q7x2",
        "core": "tenant-core-k3m9",
        "portal": "tenant-portal-w5z1",
        "driver": "tenant-driver-p8r4",
    }
    fleet = {"X-License-Key": issue_key(tier="fleet", sub=tenants["fleet"])}
    core = {"X-License-Key": issue_key(tier="core", sub=tenants["core"])}
    portal = {"X-License-Key": issue_key(tier="enterprise", sub=tenants["portal"])}
    driver = {"X-License-Key": issue_key(tier="core", sub=tenants["driver"])}
    header, payload, signature = core["X-License-Key"].split(".")
    forged = {"X-License-Key": f"{header}.{payload}.{signature[:-4]}AAAA"}
    unknown_tenant = "tenant-unknown-j2v6"
    duplicate: CIMultiDict[str] = CIMultiDict([*core.items(), *core.items()])
    shipments = "/api/v1/shipments"
    traffic: list[tuple[str, str, str, Mapping[str, str], int, str]] = [
        *[("operations", "POST", OPTIMIZE, fleet, 200, "allowed")] * 3,
        *[("operations", "POST", OPTIMIZE, core, 403, "blocked")] * 2,
        ("operations", "GET", shipments, core, 200, "allowed"),
        (
            "operations",
            "GET",
            "/api/v1/shipments/1",
            {"X-License-Key": CLASSIC_KEY},
            200,
            "classic",
        ),
        ("operations", "GET", "/xdispatch/jobs", {}, 200, "classic"),
        *[("operations", "GET", "/api/v1/health", {}, 200, "public")] * 2,
        ("operations", "GET", shipments, {}, 401, "unlicensed"),
        ("operations", "GET", shipments, forged, 401, "unlicensed"),
        ("operations", "GET", shipments, {"X-Tenant-Id": unknown_tenant}, 401, "unlicensed"),
        ("operations", "GET", shipments, duplicate, 400, "rejected"),
        ("client_portal", "GET", "/api/v1/branding/logo.png", portal, 200, "allowed"),
        ("client_portal", "GET", "/api/v1/health", {}, 200, "public"),
        ("driver_app", "GET", "/api/v1/jobs", driver, 200, "allowed"),
    ]
    sent: Counter[tuple[str, str]] = Counter()
    for app, method, path, headers, status, outcome in traffic:
        async with client.request(method, gateway.url(app, path), headers=headers) as response:
            await response.read()
            assert response.status == status, (app, method, path, outcome)
        sent[app, outcome] += 1
    ambiguous = await raw_status(
        gateway.listen["operations"],
        b"GET /api/v1/%2e%2e%2Fshipments HTTP/1.1\r\nHost: x\r\nX-License-Key: "
        + core["X-License-Key"].encode()
        + b"\r\n\r\n",
    )
    assert ambiguous == 400
    sent["operations", "rejected"] += 1

    text = await metrics_text(client, gateway)
    events = gateway.events()

    # every metric of docs/design.md §6 is exposed (labelled ones without children show HELP/TYPE)
    type_lines = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")
    }
    for name in METRIC_NAMES:
        assert name in type_lines, f"# TYPE {name} missing"
    assert type_lines["gateway_request_duration_seconds"] == "histogram"
    assert type_lines["gateway_decision_duration_seconds"] == "histogram"
    assert type_lines["gateway_config_info"] == "gauge"

    parsed = parse(text)
    for app in APP_NAMES:
        for outcome in OUTCOMES:
            got = value(parsed, "gateway_requests_total", app=app, outcome=outcome)
            assert got == sent[app, outcome], (app, outcome)
    assert (
        value(
            parsed,
            "gateway_feature_block_total",
            app="operations",
            feature="ops.basic_shipment_optimization",
            tier="core",
        )
        == 2
    )
    assert sum(parsed["gateway_feature_block_total"].values()) == 2
    assert value(parsed, "gateway_classic_passthrough_total", app="operations") == 2
    assert sum(parsed["gateway_classic_passthrough_total"].values()) == 2
    # each key is verified once, then served from the cache
    assert value(parsed, "gateway_license_checks_total", result="valid") == 4
    assert value(parsed, "gateway_license_checks_total", result="license_bad_signature") == 1
    assert value(parsed, "gateway_license_cache_total", result="miss") >= 5
    assert value(parsed, "gateway_license_cache_total", result="hit") >= 1
    assert sum(parsed["gateway_upstream_errors_total"].values()) == 0
    answered = sum(sent.values())
    assert value(parsed, "gateway_decision_duration_seconds_count") >= answered
    for app in APP_NAMES:
        requests = sum(n for (a, _), n in sent.items() if a == app)
        assert value(parsed, "gateway_request_duration_seconds_count", app=app) == requests
    assert parsed["gateway_config_info"] and all(
        v == 1 for v in parsed["gateway_config_info"].values()
    )
    assert value(parsed, "gateway_config_reloads_total", result="failure") == 0

    for tenant in (*tenants.values(), unknown_tenant):
        assert tenant not in text
    # the tenant ids are not lost: they are in the events instead
    assert {e["tenant"] for e in events if e["event"] == "feature_block"} == {tenants["core"]}

    promtool_check(text)


async def upstream_failure_metrics(
    tmp_path: Path,
    key_dir: Path,
    upstreams: dict[str, EchoUpstream],
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> dict[str, dict[Labels, float]]:
    """One licensed driver_app request whose upstream is gone (502), then the metrics."""
    await upstreams["driver_app"].stop()
    async with running_gateway(tmp_path, key_dir, upstream_ports) as gw:
        async with client.get(
            gw.url("driver_app", "/api/v1/jobs"), headers={"X-License-Key": issue_key()}
        ) as response:
            assert response.status == 502
            assert (await response.json(content_type=None))["code"].startswith("upstream_")
        return parse(await metrics_text(client, gw))


async def test_upstream_failure_is_counted(
    tmp_path: Path,
    key_dir: Path,
    upstreams: dict[str, EchoUpstream],
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    parsed = await upstream_failure_metrics(
        tmp_path, key_dir, upstreams, upstream_ports, client, issue_key
    )
    errors = {k: v for k, v in parsed["gateway_upstream_errors_total"].items() if v}
    assert len(errors) == 1, errors
    ((labels, count),) = errors.items()
    assert count == 1
    assert dict(labels)["app"] == "driver_app"
    assert dict(labels)["kind"] in ("refused", "reset")
    assert value(parsed, "gateway_requests_total", app="driver_app", outcome="upstream_error") == 1


async def test_upstream_failure_is_one_outcome_only(
    tmp_path: Path,
    key_dir: Path,
    upstreams: dict[str, EchoUpstream],
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    parsed = await upstream_failure_metrics(
        tmp_path, key_dir, upstreams, upstream_ports, client, issue_key
    )
    outcomes = {
        dict(labels)["outcome"]: v
        for labels, v in parsed["gateway_requests_total"].items()
        if dict(labels)["app"] == "driver_app" and v
    }
    assert outcomes == {"upstream_error": 1}


async def test_metrics_of_a_fresh_gateway_pass_promtool(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    text = await metrics_text(client, gateway)
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    parsed = parse(text)
    assert parsed["gateway_build_info"] == {
        (("python", platform.python_version()), ("version", __version__)): 1.0
    }
    assert value(parsed, "process_resident_memory_bytes") > 0
    assert value(parsed, "process_open_fds") > 0
    assert set(parsed["gateway_store_errors_total"]) == {
        (("op", op),) for op in ("get", "classic_key", "provision", "seats", "usage", "reminders")
    }
    promtool_check(text)


def _fake_process(proc: Path, pid: int, ppid: int, *, cpu_ticks: int, rss_pages: int,
                  vsize: int, start_ticks: int, fds: int, max_fds: int) -> None:  # fmt: skip
    folder = proc / str(pid)
    (folder / "fd").mkdir(parents=True)
    for fd in range(fds):
        (folder / "fd" / str(fd)).touch()
    # /proc/<pid>/stat after the ")": state ppid ... utime(11) stime(12) ... starttime(19)
    # vsize(20) rss(21); a command name with ") " in it must not shift the fields.
    fields = ["S", str(ppid), *["0"] * 9, str(cpu_ticks), "0", *["0"] * 6, str(start_ticks)]
    fields += [str(vsize), str(rss_pages), "0"]
    (folder / "stat").write_text(f"{pid} (gate way) x) {' '.join(fields)}\n")
    (folder / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        f"Max open files            {max_fds}                 {max_fds}                 files\n"
    )


def test_worker_processes_are_reported_as_one_gateway(tmp_path: Path) -> None:
    """``--workers N``: process_* of the supervisor and its workers, combined."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu  1 2 3\nbtime 1700000000\n")
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    common = {"vsize": 1000, "max_fds": 1024}
    _fake_process(proc, 100, 1, cpu_ticks=ticks, rss_pages=10, start_ticks=0, fds=3, **common)
    _fake_process(proc, 101, 100, cpu_ticks=2 * ticks, rss_pages=20, start_ticks=5 * ticks,
                  fds=4, vsize=2000, max_fds=512)  # fmt: skip
    _fake_process(proc, 102, 100, cpu_ticks=3 * ticks, rss_pages=30, start_ticks=9 * ticks,
                  fds=5, **common)  # fmt: skip
    _fake_process(proc, 200, 1, cpu_ticks=99 * ticks, rss_pages=99, start_ticks=0, fds=9, **common)
    (proc / "self").mkdir()  # not a pid: ignored

    collector = WorkerProcessesCollector(100, proc=str(proc))
    assert sorted(collector.pids()) == [100, 101, 102]
    got = {family.samples[0].name: family.samples[0].value for family in collector.collect()}
    assert got == {
        "process_cpu_seconds_total": 6.0,
        "process_resident_memory_bytes": 60.0 * page,
        "process_virtual_memory_bytes": 4000.0,
        "process_start_time_seconds": 1700000009.0,  # the latest (re)start
        "process_open_fds": 12.0,
        "process_max_fds": 512.0,  # the tightest limit
    }


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz_with_upstreams_up(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    async with client.get(gateway.admin_url("/healthz")) as response:
        assert response.status == 200
        # the pid: a supervisor (make demo) tells the process it started from a squatter
        assert await response.json() == {"status": "ok", "pid": os.getpid()}
    async with client.get(gateway.admin_url("/readyz")) as response:
        assert response.status == 200
        body = await response.json()
    assert body["ready"] is True
    assert body["upstreams"] == dict.fromkeys(APP_NAMES, True)
    assert body["draining"] is False
    assert body["config"]["routes"] and body["config"]["matrix"]


async def test_readyz_is_503_while_an_upstream_is_down_from_the_start(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], client: aiohttp.ClientSession
) -> None:
    ports = {**upstream_ports, "client_portal": free_port()}  # nothing listens there
    async with running_gateway(tmp_path, key_dir, ports) as gw:
        async with client.get(gw.admin_url("/healthz")) as response:
            assert response.status == 200  # alive, just not ready
        async with client.get(gw.admin_url("/readyz")) as response:
            assert response.status == 503
            body = await response.json()
    assert body["ready"] is False
    assert body["upstreams"] == {"operations": True, "client_portal": False, "driver_app": True}


async def test_readyz_is_503_when_an_upstream_goes_down(
    gateway: Gateway,
    upstreams: dict[str, EchoUpstream],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    headers = {"X-License-Key": issue_key(tier="core")}
    async with client.get(gateway.url("operations", "/api/v1/shipments"), headers=headers) as r:
        assert r.status == 200  # the pool has talked to the upstream
    async with client.get(gateway.admin_url("/readyz")) as response:
        assert response.status == 200

    await upstreams["operations"].stop()
    async with client.get(gateway.admin_url("/readyz")) as response:
        assert response.status == 503
        body = await response.json()
    assert body["upstreams"]["operations"] is False
    async with client.get(gateway.admin_url("/healthz")) as response:
        assert response.status == 200


def test_a_joint_tally_counts_into_every_child_it_joins() -> None:
    """``Metrics.joint_tally``: one hot-path add for counts that always move together (the
    flood path's outcome, key result and cache miss), each series counted at flush, next
    to what the children's own tallies count."""
    metrics = Metrics()
    miss, forged = metrics.cache_miss, metrics.license_result["license_bad_signature"]
    joint = metrics.joint_tally(miss, forged)
    assert metrics.joint_tally(miss, forged) is joint  # one per combination
    joint.n += 3
    miss.inc()
    metrics.flush()
    registry = metrics.registry
    assert registry.get_sample_value("gateway_license_cache_total", {"result": "miss"}) == 4
    checks = registry.get_sample_value(
        "gateway_license_checks_total", {"result": "license_bad_signature"}
    )
    assert checks == 3
    metrics.flush()  # counted once: the tally is empty after a flush
    assert registry.get_sample_value("gateway_license_cache_total", {"result": "miss"}) == 4
