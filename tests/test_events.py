"""The event log: bounded queue, batches written off the event loop, drops counted, file and
stdout sinks, rotation and reopening, and block summaries with exact counts."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.config import EventSettings
from gateway.events import EventLog
from gateway.metrics import Metrics


def dropped(metrics: Metrics, sink: str) -> float:
    metrics.flush()
    value = metrics.registry.get_sample_value("gateway_events_dropped_total", {"sink": sink})
    return value or 0.0


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def eventually(condition: Any, what: str) -> None:
    """Wait until ``condition()`` holds (a generous bound, never a timing assertion)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_file_sink_writes_json_lines_in_batches(tmp_path: Path) -> None:
    metrics = Metrics()
    path = tmp_path / "deep" / "events.jsonl"
    log = EventLog(f"file://{path}", metrics, flush_interval=0.01)
    log.start()
    for n in range(5):
        log.emit("upgrade_click", tenant="acme", n=n)
    await eventually(lambda: path.exists() and len(path.read_text().splitlines()) == 5, "5 lines")
    await log.aclose(deadline=10)
    events = lines(path)
    assert [e["n"] for e in events] == list(range(5))
    assert all(e["event"] == "upgrade_click" and isinstance(e["ts"], float) for e in events)


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    metrics = Metrics()
    log = EventLog(f"file://{tmp_path / 'e.jsonl'}", metrics, max_queue=3)
    for n in range(10):
        log.emit("upgrade_click", n=n)  # no flusher running: the queue fills
    assert log.pending() == 3
    assert dropped(metrics, "file") == 7
    await log.aclose(deadline=10)  # what was queued is still written
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 3


async def test_stdout_sink(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    log = EventLog("stdout:", Metrics())
    log.emit("license_invalid", reason="license_bad_signature")
    await log.aclose(deadline=10)
    line = json.loads(capfdbinary.readouterr().out)
    assert line["event"] == "license_invalid" and line["reason"] == "license_bad_signature"


def test_synchronous_close_writes_what_is_queued(tmp_path: Path) -> None:
    log = EventLog(f"file://{tmp_path / 'e.jsonl'}", Metrics())
    log.emit("upgrade_click", n=1)
    log.close()
    assert [e["n"] for e in lines(tmp_path / "e.jsonl")] == [1]


def test_unknown_sink_is_refused() -> None:
    with pytest.raises(ValueError, match="events.sink"):
        EventLog("kafka://x", Metrics())


async def test_a_stuck_file_write_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """A sink whose writes block (a full disk on NFS, a pipe nobody reads): requests keep
    being served, and events beyond the queue bound are dropped and counted."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    # A reader that reads nothing yet: the pipe's buffer (64 KiB) fills, then writes block.
    reader_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    loop_ran = threading.Event()
    received = bytearray()
    ran_while_stuck: list[bool] = []

    def read_later() -> None:
        # Without a fix the loop itself is stuck in write(); unblock it after a while so
        # the test fails instead of hanging.
        ran_while_stuck.append(loop_ran.wait(timeout=20))
        os.set_blocking(reader_fd, True)
        while chunk := os.read(reader_fd, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read_later)
    reader.start()
    metrics = Metrics()
    log = EventLog(f"file://{fifo}", metrics, max_queue=100, flush_interval=0.001)
    flusher = asyncio.get_running_loop().create_task(log.run())
    try:
        for n in range(100):  # ~100 KiB: more than the pipe holds
            log.emit("upgrade_click", n=n, pad="x" * 1000)
        await eventually(lambda: log.pending() == 0, "the flusher took the batch")
        loop_ran.set()  # reached only while the loop runs
        for n in range(100, 210):
            log.emit("upgrade_click", n=n)
        assert log.pending() == 100 and dropped(metrics, "file") == 10
    finally:
        loop_ran.set()
        flusher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flusher
        log.close()
        await asyncio.to_thread(reader.join)
        os.close(reader_fd)
    assert ran_while_stuck == [True]
    assert len(received.splitlines()) == 200


@pytest.mark.parametrize("signalled", [True, False], ids=["reopen", "renamed-under-it"])
def test_file_is_reopened_after_logrotate_moves_it(tmp_path: Path, signalled: bool) -> None:
    """logrotate renames the file and sends SIGUSR1 (``reopen``); without the signal the
    next batch still notices the path names another file."""
    path = tmp_path / "events.jsonl"
    log = EventLog(f"file://{path}", Metrics())
    log.emit("upgrade_click", n=1)
    log.flush_now()
    path.rename(tmp_path / "events.jsonl.1")
    if signalled:
        log.reopen()
    log.emit("upgrade_click", n=2)
    log.close()
    assert [e["n"] for e in lines(tmp_path / "events.jsonl.1")] == [1]
    assert [e["n"] for e in lines(path)] == [2]


async def test_file_sink_rotates_by_size_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    settings = EventSettings(sink=f"file://{path}", max_bytes=300, backups=2)
    log = EventLog.from_settings(settings.sink, settings, Metrics())
    for n in range(12):
        log.emit("upgrade_click", n=n)  # ~60 bytes a line
        log.flush_now()  # one batch per event, so rotation can happen between any two
    await log.aclose(deadline=10)
    files = [path, tmp_path / "events.jsonl.1", tmp_path / "events.jsonl.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    assert all(p.stat().st_size <= 300 for p in files)
    kept = [e["n"] for p in reversed(files) for e in lines(p)]
    assert kept == list(range(12 - len(kept), 12))  # the newest, in order, none repeated
    assert lines(path)[-1]["n"] == 11


# --------------------------------------------------------------------------- block summaries


def block(log: EventLog, tenant: str, tier: str = "core", feature: str = "ops.f") -> None:
    """A ``feature_block`` with the fields the enforcer sends."""
    log.emit(
        "feature_block", tenant=tenant, tier=tier, app="operations", feature=feature,
        route="/api/v1/x", request_id="r", revision="a/b", role=None, user=None,
    )  # fmt: skip


async def test_blocks_past_the_first_are_counted_in_a_summary(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    metrics = Metrics()
    log = EventLog(f"file://{path}", metrics, blocks_per_interval=3)
    for _ in range(10):
        block(log, "acme")
    for _ in range(2):
        block(log, "beta")
    for _ in range(5):
        block(log, "acme", tier="fleet")  # a tenant that upgraded mid-interval: its own count
    await log.aclose(deadline=10)
    events = lines(path)
    verbatim = [(e["tenant"], e["tier"]) for e in events if e["event"] == "feature_block"]
    assert verbatim == [("acme", "core")] * 3 + [("beta", "core")] * 2 + [("acme", "fleet")] * 3
    summaries = {
        (e["tenant"], e["tier"]): e for e in events if e["event"] == "feature_block_summary"
    }
    assert {key: s["count"] for key, s in summaries.items()} == {
        ("acme", "core"): 7,
        ("acme", "fleet"): 2,
    }
    summary = summaries[("acme", "core")]
    assert (summary["app"], summary["feature"]) == ("operations", "ops.f")
    assert summary["interval_start"] <= summary["interval_end"]
    # exact: every block is a line or part of a count
    assert len(verbatim) + sum(s["count"] for s in summaries.values()) == 17
    assert dropped(metrics, "file") == 0


async def test_summary_is_written_when_the_interval_ends(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(
        f"file://{path}", Metrics(), flush_interval=0.01, blocks_per_interval=1,
        summary_interval=0.2,
    )  # fmt: skip
    log.start()
    try:
        for _ in range(5):
            block(log, "acme")

        def summarised() -> bool:
            return path.exists() and "feature_block_summary" in path.read_text()

        await eventually(summarised, "a summary without a close")
        summary = next(e for e in lines(path) if e["event"] == "feature_block_summary")
        assert summary["interval_end"] - summary["interval_start"] == pytest.approx(0.2)
    finally:
        await log.aclose(deadline=10)
    events = lines(path)
    total = sum(
        1 if e["event"] == "feature_block" else e["count"]
        for e in events
        if e["event"] in ("feature_block", "feature_block_summary")
    )
    assert total == 5


async def test_blocks_that_find_the_queue_full_are_counted_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    metrics = Metrics()
    log = EventLog(f"file://{path}", metrics, max_queue=2, blocks_per_interval=10)
    for _ in range(5):
        block(log, "acme")
    assert log.pending() == 2
    await log.aclose(deadline=10)
    events = lines(path)
    assert [e["event"] for e in events] == ["feature_block"] * 2 + ["feature_block_summary"]
    assert events[-1]["count"] == 3 and dropped(metrics, "file") == 0
