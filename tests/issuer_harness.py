"""The issuing service as a real process for the tests: its folder (issuer.toml, the tier
matrix, a signing key rotated in and activated) and ``running_issuer``, which starts
``gateway issuer serve`` in a subprocess and stops it by its pid."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from gateway.signing_keys import activate, rotate
from tests.harness import REPO, free_port, stop_process
from tests.provisioning import signed_call

BILLING_SECRET = "billing-order-secret"
START_DEADLINE_SECONDS = 20.0


def hook_target(name: str, admin_port: int, secret_env: str = "GATEWAY_PROVISION_SECRET") -> str:
    return (
        f'\n[[targets]]\nname = "{name}"\n'
        f'provision_url = "http://127.0.0.1:{admin_port}/admin/provision"\n'
        f'secret_env = "{secret_env}"\n'
    )


def store_target(name: str, url: str) -> str:
    return f'\n[[targets]]\nname = "{name}"\nstore = "{url}"\n'


def write_issuer(
    folder: Path, targets: str, *, delivery: str = "", kid: str = "k1"
) -> tuple[Path, int]:
    """An issuer folder: issuer.toml (on a free port), the shipped matrix, and the signing
    key ``kid`` rotated in (public key in ``folder/keys``) and activated. Returns the
    config path and the port."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "tier_matrix.toml", folder / "tier_matrix.toml")
    (folder / "keys").mkdir(exist_ok=True)
    if not (folder / "issuer-keys" / f"{kid}.key").exists():
        rotate(folder / "issuer-keys", (folder / "keys",), kid)
        activate(folder / "issuer-keys", kid)
    port = free_port()
    text = (
        f'[issuer]\nlisten = "127.0.0.1:{port}"\nname = "issuer"\n\n'
        '[keys]\ndir = "issuer-keys/"\npublish = ["keys/"]\n\n'
        '[[billing]]\nkey_id = "billing-main"\nsecret_env = "ISSUER_BILLING_SECRET"\n\n'
        '[audit]\nlog = "audit.jsonl"\n\n'
        f"[delivery]\npoll_seconds = 0.1\n{delivery}\n{targets}"
    )
    path = folder / "issuer.toml"
    path.write_text(text)
    return path, port


class Issuer:
    """A running issuer process and signed calls to it."""

    def __init__(self, port: int, session: aiohttp.ClientSession) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = session

    async def call(
        self, method: str, path: str, body: Any = None, secret: str = BILLING_SECRET
    ) -> tuple[int, dict[str, Any]]:
        return await signed_call(self.session, method, self.base + path, body, secret=secret)

    async def order(self, **body: Any) -> tuple[int, dict[str, Any]]:
        return await self.call("POST", "/v1/orders", body)

    async def wait_for(self, order_id: str, target: str, state: str) -> dict[str, Any]:
        """Poll ``GET /v1/orders/{id}`` until ``target``'s delivery is in ``state``."""
        deadline = time.monotonic() + 20.0
        while True:
            status, answer = await self.call("GET", f"/v1/orders/{order_id}")
            assert status == 200, answer
            states = {d["target"]: d["state"] for d in answer["deliveries"]}
            if states.get(target) == state:
                return answer
            assert time.monotonic() < deadline, (target, state, answer["deliveries"])
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running_issuer(
    config: Path, port: int, env: Mapping[str, str] | None = None
) -> AsyncIterator[Issuer]:
    """``gateway issuer serve`` in a subprocess, up once ``/healthz`` answers. When its
    port was taken meanwhile (by another test process), it moves to another free one."""
    environment = {**os.environ, "ISSUER_BILLING_SECRET": BILLING_SECRET, **(env or {})}
    log_path = config.parent / "issuer.log"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", "issuer", "serve", "--config",
                     str(config)],
                    env=environment, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            try:
                if await _answers(session, process, port):
                    yield Issuer(port, session)
                    return
            finally:
                stop_process(process)
            assert "address already in use" in log_path.read_text(), log_path.read_text()
            fresh = free_port()
            config.write_text(config.read_text().replace(f":{port}", f":{fresh}"))
            port = fresh
        raise AssertionError("the issuer found no free port")


async def _answers(
    session: aiohttp.ClientSession, process: subprocess.Popen[bytes], port: int
) -> bool:
    """Wait for ``/healthz``; False when the process exited first."""
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    timeout = aiohttp.ClientTimeout(total=1.0)
    while process.poll() is None:
        try:
            async with session.get(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
                if response.status == 200:
                    return True
        except (aiohttp.ClientError, TimeoutError):
            pass
        assert time.monotonic() < deadline, "the issuer did not come up"
        await asyncio.sleep(0.05)
    return False
