"""The enforcer without sockets, for tests: a real ``Shared`` (caches, metrics, an event log
writing to a file, a real store) and ``RequestHead`` objects built as the relay builds them.

    world = EnforcerWorld(config, tmp_path)
    verdict = await world.decide("operations", world.head("GET", "/api/v1/shipments", key=k))
    world.events()      # the events written, as dicts
    world.sample("gateway_license_cache_total", result="hit")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.enforcer import NEED_TENANT, Enforcer, RequestHead, Shared, Verdict
from gateway.events import SAMPLED_EVENTS, EventLog
from gateway.matrix import AppName
from gateway.metrics import Metrics
from gateway.store import TenantStore, open_store


class EnforcerWorld:
    def __init__(
        self,
        config: Config,
        folder: Path,
        store: TenantStore | None = None,
        *,
        per_second: float = 1000.0,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        folder.mkdir(parents=True, exist_ok=True)
        self.events_path = folder / "enforcer-events.jsonl"
        self.log = EventLog(
            f"file://{self.events_path}",
            self.metrics,
            per_second=dict.fromkeys((*SAMPLED_EVENTS, "license_invalid"), per_second),
        )
        self.store = store if store is not None else open_store("memory://", config.keyring)
        self.shared = Shared(config, self.metrics, self.log, self.store)
        self._enforcers: dict[AppName, Enforcer] = {}
        self._closed = False

    def enforcer(self, app: AppName) -> Enforcer:
        found = self._enforcers.get(app)
        if found is None:
            found = self._enforcers[app] = Enforcer(app, self.config, self.shared)
        return found

    def head(
        self,
        method: str,
        target: str | bytes,
        *,
        key: str | bytes | None = None,
        tenant: str | None = None,
        role: str | None = None,
        user: str | None = None,
        request_id: str = "",
        peer: bytes = b"127.0.0.1",
        host: bytes | None = b"gateway.test",
        **fields: Any,
    ) -> RequestHead:
        raw = target.encode() if isinstance(target, str) else target
        headers: list[tuple[bytes, bytes, bytes]] = []
        head = RequestHead(method, raw, headers)
        if key is not None:
            head.license_key = key.encode() if isinstance(key, str) else key
            head.license_count = 1
        head.tenant = None if tenant is None else tenant.encode()
        head.role = None if role is None else role.encode()
        head.user = None if user is None else user.encode()
        head.request_id = request_id
        head.peer = peer
        head.host = host
        for name, value in fields.items():
            setattr(head, name, value)
        return head

    async def decide(self, app: AppName, head: RequestHead) -> Verdict:
        """check, and when it asks, prefetch and check again (as the relay does)."""
        enforcer = self.enforcer(app)
        verdict = enforcer.check(head)
        if verdict.kind == NEED_TENANT:
            await enforcer.prefetch(head)
            verdict = enforcer.check(head, fetched=True)
        return verdict

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        self.log.flush_now()
        if not self.events_path.exists():
            return []
        found = [json.loads(line) for line in self.events_path.read_text().splitlines() if line]
        return [event for event in found if kind is None or event["event"] == kind]

    def sample(self, name: str, **labels: str) -> float:
        self.metrics.flush()
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.log.close()


WorldFactory = Callable[..., EnforcerWorld]  # the ``make_world`` fixture (tests/conftest.py)


def body(verdict: Verdict) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(verdict.body)
    return decoded
