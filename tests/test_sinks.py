"""The HTTP event sink against a real collector (aiohttp on loopback): batches, retries with
backoff while the collector is down, at-least-once delivery, overflow counted, the shutdown
deadline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.cli import main
from gateway.config import EventSettings
from gateway.events import EventLog
from gateway.metrics import Metrics
from gateway.sinks import HttpSink, resolve_sink, sink_kind, sink_problem
from tests.harness import free_port, start_app
from tests.test_config import config_problems, edit
from tests.test_events import dropped, eventually


class Collector:
    """An analytics collector: takes POSTed JSON lines, answers what it is told to."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/ingest"
        self.attempts: list[tuple[str, list[int]]] = []  # (Idempotency-Key, event numbers)
        self.answers: list[int] = []  # statuses to answer first, in order; then 202
        self.hang_once = False  # take the first batch, then never answer it
        self.release = asyncio.Event()
        self._accepted: list[tuple[str, list[int]]] = []
        self._runner: web.AppRunner | None = None

    def received(self) -> list[int]:
        """Event numbers of the batches it accepted."""
        return [n for _, numbers in self._accepted for n in numbers]

    def accepted(self) -> list[tuple[str, list[int]]]:
        return self._accepted

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self._ingest)
        self._runner, _ = await start_app(app, self.port)

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ingest(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-ndjson"
        body = await request.read()
        numbers = [json.loads(line)["n"] for line in body.splitlines()]
        key = request.headers["Idempotency-Key"]
        self.attempts.append((key, numbers))
        if self.hang_once:
            self.hang_once = False
            self._accepted.append((key, numbers))  # stored, but the answer never arrives
            await self.release.wait()
            return web.Response(status=202)
        if self.answers:
            return web.Response(status=self.answers.pop(0), headers={"Retry-After": "0"})
        self._accepted.append((key, numbers))
        return web.Response(status=202)


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    server = Collector(free_port())
    yield server
    await server.stop()


def http_log(metrics: Metrics, url: str, **overrides: object) -> EventLog:
    fields: dict[str, object] = {"retry_max_backoff": 0.2, "batch_size": 10, "sink": url}
    fields.update(overrides)
    settings = EventSettings(**fields)  # type: ignore[arg-type]
    log = EventLog.from_settings(url, settings, metrics)
    log.flush_interval = 0.01
    return log


def sink_of(log: EventLog) -> HttpSink:
    assert isinstance(log.sink, HttpSink)
    return log.sink


async def test_batches_are_posted_as_json_lines(collector: Collector) -> None:
    await collector.start()
    metrics = Metrics()
    log = http_log(metrics, collector.url)
    log.start()
    for n in range(25):
        log.emit("upgrade_click", n=n)
    await eventually(lambda: len(collector.received()) == 25, "25 events delivered")
    await log.aclose(deadline=10)
    assert collector.received() == list(range(25))
    assert all(len(numbers) <= 10 for _, numbers in collector.attempts)  # batch_size
    assert dropped(metrics, "http") == 0


async def test_collector_down_at_first_gets_every_event_once_it_is_back(
    collector: Collector,
) -> None:
    metrics = Metrics()
    log = http_log(metrics, collector.url)
    log.start()
    for n in range(30):
        log.emit("upgrade_click", n=n)
    await eventually(lambda: sink_of(log).failed_attempts >= 3, "retries while it is down")
    for n in range(30, 40):  # still queuing meanwhile
        log.emit("upgrade_click", n=n)
    await collector.start()
    await eventually(lambda: len(collector.received()) == 40, "delivery after the outage")
    await log.aclose(deadline=10)
    # A refused connection delivered nothing, so nothing came twice.
    assert collector.received() == list(range(40))
    assert sink_of(log).failed_attempts == 0 and dropped(metrics, "http") == 0


async def test_server_errors_are_retried_with_the_same_batch_key(collector: Collector) -> None:
    collector.answers = [503, 500, 429]
    await collector.start()
    log = http_log(Metrics(), collector.url)
    log.start()
    for n in range(5):
        log.emit("upgrade_click", n=n)
    await eventually(lambda: collector.received() == list(range(5)), "delivery after retries")
    await log.aclose(deadline=10)
    keys = {key for key, _ in collector.attempts}
    assert len(collector.attempts) == 4 and len(keys) == 1


async def test_a_lost_answer_resends_the_batch_with_the_same_key(collector: Collector) -> None:
    """At-least-once: the collector stored the batch but its answer never came, so the
    batch is sent again; the repeated Idempotency-Key lets the collector drop the copy."""
    collector.hang_once = True
    await collector.start()
    log = http_log(Metrics(), collector.url, http_timeout=0.3)
    log.start()
    for n in range(3):
        log.emit("upgrade_click", n=n)
    await eventually(lambda: len(collector.accepted()) == 2, "the batch sent again")
    await log.aclose(deadline=10)
    (first_key, first), (second_key, second) = collector.accepted()
    assert first == second == [0, 1, 2] and first_key == second_key


async def test_a_refused_batch_is_dropped_and_counted(collector: Collector) -> None:
    collector.answers = [400]
    await collector.start()
    metrics = Metrics()
    log = http_log(metrics, collector.url)
    log.start()
    for n in range(3):
        log.emit("upgrade_click", n=n)
    await eventually(lambda: len(collector.attempts) == 1, "the refusal")
    log.emit("upgrade_click", n=3)
    await eventually(lambda: collector.received() == [3], "the next batch")
    await log.aclose(deadline=10)
    assert dropped(metrics, "http") == 3


async def test_overflow_while_the_collector_is_down_is_counted(collector: Collector) -> None:
    metrics = Metrics()
    log = http_log(metrics, collector.url, max_queue=5, batch_size=2)
    for n in range(20):
        log.emit("upgrade_click", n=n)  # never blocks: the queue holds 5
    assert dropped(metrics, "http") == 15
    # The collector never comes: at the deadline the rest is given up, and counted.
    await log.aclose(deadline=0.5)
    assert dropped(metrics, "http") == 20


async def test_shutdown_delivers_what_is_queued(collector: Collector) -> None:
    await collector.start()
    log = http_log(Metrics(), collector.url)
    log.start()
    for n in range(100):
        log.emit("upgrade_click", n=n)
    await log.aclose(deadline=30)
    assert collector.received() == list(range(100))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param("stdout:", None, id="stdout"),
        pytest.param("file:///var/log/e.jsonl", None, id="file"),
        pytest.param("file://e.jsonl", None, id="file-relative"),
        pytest.param("http://collector:8080/ingest", None, id="http"),
        pytest.param("https://collector/ingest", None, id="https"),
        pytest.param("file://", "needs a path", id="file-no-path"),
        pytest.param("http:///ingest", "needs a host", id="http-no-host"),
        pytest.param("kafka://events", "expected stdout:", id="kafka"),
    ],
)
def test_sink_urls(url: str, problem: str | None) -> None:
    found = sink_problem(url)
    assert found == problem if problem is None else problem in (found or "")


def test_sink_labels_and_relative_paths(tmp_path: Path) -> None:
    assert [sink_kind(u) for u in ("stdout:", "file:///x", "http://c/", "https://c/")] == [
        "stdout",
        "file",
        "http",
        "http",
    ]
    assert resolve_sink("file://logs/e.jsonl", tmp_path) == f"file://{tmp_path}/logs/e.jsonl"
    assert resolve_sink("file:///abs/e.jsonl", tmp_path) == "file:///abs/e.jsonl"


@pytest.mark.parametrize(
    ("section", "new", "key"),
    [
        pytest.param("events", 'sink = "http://"', "events.sink", id="http-no-host"),
        pytest.param("events", 'sink = "kafka://x"', "events.sink", id="unknown-scheme"),
        pytest.param("events", "backups = 0", "events.backups", id="no-backups"),
        pytest.param("events", "max_bytes = -1", "events.max_bytes", id="negative-size"),
        pytest.param("events", "batch_size = 0", "events.batch_size", id="empty-batches"),
        pytest.param("events", "summary_interval = 0", "events.summary_interval", id="interval"),
        pytest.param(
            "events",
            "feature_blocks_per_interval = -1",
            "events.feature_blocks_per_interval",
            id="negative-blocks",
        ),
        pytest.param("events", "retry_max_backoff = 0", "events.retry_max_backoff", id="backoff"),
        pytest.param(
            "events", "refusals_per_second = -1", "events.refusals_per_second", id="refusals"
        ),
        pytest.param("access_log", "sample_allowed = 1.5", "access_log.sample_allowed", id="rate"),
        pytest.param("access_log", 'sink = "syslog:"', "access_log.sink", id="access-sink"),
        pytest.param("access_log", "max_queue = 0", "access_log.max_queue", id="access-queue"),
    ],
)
def test_gateway_check_names_bad_sink_settings(
    config_dir: Path, section: str, new: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if section == "events":  # below the shipped [events] sink, or instead of it
        old, text = (
            'sink = "stdout:"',
            new if new.startswith("sink") else f'sink = "stdout:"\n{new}',
        )
    else:
        old, text = "", f"\n[{section}]\n{new}\n"
    path = edit(config_dir, "gateway.toml", old, text)
    (problem,) = config_problems(path)
    assert problem.key == key
    assert main(["check", "--config", str(path)]) == 1
    assert key in capsys.readouterr().err


def test_gateway_check_accepts_every_sink_setting(config_dir: Path) -> None:
    path = edit(
        config_dir,
        "gateway.toml",
        'sink = "stdout:"',
        'sink = "https://collector.example/ingest"\nbatch_size = 500\nhttp_timeout = 2.5\n'
        "retry_max_backoff = 60\nflush_deadline = 10\nfeature_blocks_per_interval = 0\n"
        "summary_interval = 300\nmax_bytes = 104857600\nbackups = 3\n\n[access_log]\n"
        'enabled = true\nsink = "file://logs/access.jsonl"\nsample_allowed = 0.1\n'
        "max_queue = 5000\nmax_bytes = 0\nbackups = 1\n",
    )
    assert main(["check", "--config", str(path)]) == 0
