"""``gateway serve --workers N``: SO_REUSEPORT listeners and metrics summed over workers."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.matrix import APP_NAMES
from tests.conftest import IssueKey
from tests.harness import write_config
from tests.test_metrics import promtool_check


async def _wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


def _allowed(metrics: str) -> float:
    found = re.search(
        r'^gateway_requests_total\{app="operations",outcome="allowed"\} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0.0


async def test_two_workers_share_listeners_and_metrics(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], issue_key: IssueKey
) -> None:
    # A store the workers share (each would keep its own memory:// store: refused).
    config, listen, admin = write_config(
        tmp_path, key_dir, upstream_ports, extra='\n[store]\nurl = "sqlite://tenants.db"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
        "--workers", "2", "--log-level", "WARNING",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, f"http://127.0.0.1:{admin}/readyz")
            key = issue_key(tier="core")
            sent = 40
            for _ in range(sent):
                # A new connection each time, so the kernel spreads them over the workers.
                async with session.get(
                    f"http://127.0.0.1:{listen['operations']}/api/v1/shipments",
                    headers={"X-License-Key": key, "Connection": "close"},
                ) as response:
                    assert response.status == 200
            # Whichever worker answers the scrape reports the total of both, once each
            # worker has flushed its counts (every 0.25 s with --workers).
            url = f"http://127.0.0.1:{admin}/metrics"
            seen = 0.0
            for _ in range(100):
                async with session.get(url) as response:
                    seen = _allowed(await response.text())
                if seen == sent:
                    break
                await asyncio.sleep(0.05)
            assert seen == sent
            for _ in range(6):
                async with session.get(url) as response:
                    text = await response.text()
                    assert _allowed(text) == sent
                # once each, for the whole gateway, not once per worker
                for name in ("gateway_build_info", "process_cpu_seconds_total",
                             "process_resident_memory_bytes", "process_open_fds"):  # fmt: skip
                    assert len(re.findall(rf"^{name}\b", text, re.M)) == 1, name
            promtool_check(text)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


@pytest.mark.parametrize(
    "store",
    [
        pytest.param("", id="memory-by-default"),
        pytest.param('\n[store]\nurl = "memory://"\n', id="memory"),
        pytest.param('\n[store]\nurl = "sqlite:///:memory:"\n', id="sqlite-in-memory"),
    ],
)
def test_several_workers_refuse_a_store_each_worker_would_keep_to_itself(
    tmp_path: Path, key_dir: Path, store: str
) -> None:
    """Each worker would hold its own tenants: a replayed signed suspend applied once per
    worker, a reinstate reaching one worker in N. Refused before any worker starts."""
    config, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1), extra=store)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the supervisor stops its workers
        process.communicate(timeout=30)
        raise AssertionError("the gateway started its workers on a per-process store") from None
    assert process.returncode == 1, stderr
    assert "store.url" in stderr and "sqlite:///" in stderr and "redis://" in stderr, stderr


def test_memory_and_sqlite_in_memory_are_the_per_process_stores(tmp_path: Path) -> None:
    from gateway.store import per_process

    assert per_process("memory://") and per_process("sqlite:///:memory:")
    assert not per_process(f"sqlite:///{tmp_path}/t.db") and not per_process("redis://r:6379/0")
