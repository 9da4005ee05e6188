"""The event log: bounded queue, batches, drops counted, file and stdout sinks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.events import EventLog
from gateway.metrics import Metrics


def _dropped(metrics: Metrics, sink: str) -> float:
    metrics.flush()
    value = metrics.registry.get_sample_value("gateway_events_dropped_total", {"sink": sink})
    return value or 0.0


async def test_file_sink_writes_json_lines_in_batches(tmp_path: Path) -> None:
    metrics = Metrics()
    path = tmp_path / "deep" / "events.jsonl"
    log = EventLog(f"file://{path}", metrics, flush_interval=0.01)
    task = asyncio.get_running_loop().create_task(log.run())
    try:
        for n in range(5):
            log.emit("feature_block", tenant="acme", n=n)
        for _ in range(200):
            if path.exists() and len(path.read_text().splitlines()) == 5:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["n"] for e in events] == list(range(5))
    assert all(e["event"] == "feature_block" and isinstance(e["ts"], float) for e in events)


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    metrics = Metrics()
    log = EventLog(f"file://{tmp_path / 'e.jsonl'}", metrics, max_queue=3)
    for n in range(10):
        log.emit("feature_block", n=n)  # no flusher running: the queue fills
    assert log.pending() == 3
    assert _dropped(metrics, "file") == 7
    log.close()  # what was queued is still written
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 3


async def test_stdout_sink(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    log = EventLog("stdout:", Metrics())
    log.emit("license_invalid", reason="license_bad_signature")
    log.close()
    line = json.loads(capfdbinary.readouterr().out)
    assert line["event"] == "license_invalid" and line["reason"] == "license_bad_signature"


def test_unknown_sink_is_refused() -> None:
    with pytest.raises(ValueError, match="events.sink"):
        EventLog("kafka://x", Metrics())
