"""1 GiB up and 1 GiB down through a `gateway serve` process, in flat memory."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import IssueKey
from tests.harness import EchoUpstream, write_config

GIB = 1 << 30
CHUNK = b"s" * (1 << 20)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
async def test_one_gibibyte_each_way_in_flat_memory(
    tmp_path: Path, key_dir: Path, upstreams: dict[str, EchoUpstream], issue_key: IssueKey
) -> None:
    ports = {app: server.port for app, server in upstreams.items()}
    config, listen, admin = write_config(tmp_path, key_dir, ports)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
        "--log-level", "WARNING",
    )  # fmt: skip
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_bytes(process.pid))
            await asyncio.sleep(0.05)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            headers = {"X-License-Key": issue_key(tier="core")}
            base = f"http://127.0.0.1:{listen['operations']}"
            async with session.get(f"{base}/api/v1/health") as response:
                assert response.status == 200
            baseline = rss_bytes(process.pid)
            sampler = asyncio.get_running_loop().create_task(sample())

            async def body() -> AsyncIterator[bytes]:
                for _ in range(GIB // len(CHUNK)):
                    yield CHUNK

            async with session.post(f"{base}/upload", headers=headers, data=body()) as response:
                assert response.status == 200
                assert (await response.json())["body_length"] == GIB
            received = 0
            async with session.get(f"{base}/download/{GIB}", headers=headers) as response:
                assert response.status == 200
                async for piece in response.content.iter_chunked(1 << 20):
                    received += len(piece)
            assert received == GIB
            sampling = False
            await sampler
    finally:
        sampling = False
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    # Flat: the gateway holds at most a few transport buffers, never the body.
    print(f"gateway RSS: baseline {baseline >> 20} MiB, peak {peak >> 20} MiB")
    assert peak - baseline < 64 * 1024 * 1024, (baseline, peak)
