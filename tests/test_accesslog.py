"""The JSON access log: one line per request, sampling of forwarded requests (refusals always
kept), written through the same off-loop spool as the events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.accesslog import AccessLog
from gateway.config import AccessLogSettings
from gateway.metrics import Metrics
from tests.test_events import dropped

KEYS = [
    "ts", "app", "method", "route", "route_name", "feature", "outcome", "status",
    "upstream_status", "duration", "bytes", "request_id", "tenant", "tier",
]  # fmt: skip


def access_log(path: Path, metrics: Metrics | None = None, **settings: Any) -> AccessLog:
    options = AccessLogSettings(sink=f"file://{path}", **settings)
    return AccessLog.from_settings(options.sink, options, metrics or Metrics())


def request(log: AccessLog, outcome: str, status: int, upstream: int | None = 200) -> None:
    log.record(
        "operations", "POST", "/api/v1/shipments/{id}/optimize", "optimize",
        "ops.basic_shipment_optimization", outcome, status, upstream, 0.00123456789, 512,
        "req-1", "acme", "core",
    )  # fmt: skip


def written(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_one_line_per_request_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = access_log(path)
    log.start()
    request(log, "blocked", 403, None)
    await log.aclose(deadline=10)
    (line,) = written(path)
    assert list(line) == KEYS
    assert line | {"ts": 0} == {
        "ts": 0, "app": "operations", "method": "POST",
        "route": "/api/v1/shipments/{id}/optimize", "route_name": "optimize",
        "feature": "ops.basic_shipment_optimization", "outcome": "blocked", "status": 403,
        "upstream_status": None, "duration": 0.001235, "bytes": 512, "request_id": "req-1",
        "tenant": "acme", "tier": "core",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("outcome", "status", "kept"),
    [
        pytest.param("allowed", 200, False, id="allowed"),
        pytest.param("classic", 200, False, id="classic"),
        pytest.param("public", 404, False, id="public"),
        pytest.param("allowed", 503, True, id="allowed-but-5xx"),
        pytest.param("blocked", 403, True, id="blocked"),
        pytest.param("unlicensed", 401, True, id="unlicensed"),
        pytest.param("rejected", 400, True, id="rejected"),
        pytest.param("upstream_error", 502, True, id="upstream-error"),
    ],
)
async def test_sampling_skips_forwarded_requests_never_refusals(
    tmp_path: Path, outcome: str, status: int, kept: bool
) -> None:
    path = tmp_path / "access.jsonl"
    log = access_log(path, sample_allowed=0.0)
    request(log, outcome, status)
    assert log.pending() == int(kept)
    await log.aclose(deadline=10)
    assert len(written(path)) == int(kept)


async def test_disabled_access_log_opens_nothing_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = access_log(path, enabled=False)
    log.start()
    request(log, "blocked", 403)
    log.reopen()
    assert log.pending() == 0
    await log.aclose(deadline=10)
    assert not path.exists()


async def test_lines_past_the_queue_bound_are_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    log = access_log(tmp_path / "access.jsonl", metrics, max_queue=2)
    for _ in range(5):
        request(log, "allowed", 200)
    assert dropped(metrics, "access_log") == 3
    await log.aclose(deadline=10)


async def test_access_log_rotates_and_reopens_like_the_event_file(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = access_log(path, max_bytes=1000, backups=1)
    for _ in range(8):  # ~310 bytes a line: three fit in 1000, lines 1-3 are rotated out
        request(log, "allowed", 200)
        log.flush_now()
    path.rename(tmp_path / "moved.jsonl")  # logrotate, then SIGUSR1
    log.reopen()
    request(log, "allowed", 200)
    await log.aclose(deadline=10)
    counts = {p.name: len(written(p)) for p in tmp_path.iterdir()}
    assert counts == {"access.jsonl.1": 3, "moved.jsonl": 2, "access.jsonl": 1}
