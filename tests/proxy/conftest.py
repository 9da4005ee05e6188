"""Fixtures of the proxy tests: a recording upstream and a gateway in front of it whose
store holds one tenant; an enforcer and a client connection on fake transports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.config import Config
from gateway.enforcer import Enforcer, Shared
from gateway.events import EventLog
from gateway.metrics import Metrics
from gateway.store.memory import MemoryStore
from tests.conftest import GatewayFactory, IssueKey
from tests.harness import Gateway
from tests.proxy.fake import Wire
from tests.rawhttp import RecordingUpstream

MAX_HEADER_BYTES = 4096
MAX_HEADERS = 30
ACME_CONFIG = f"""
[server]
max_header_bytes = {MAX_HEADER_BYTES}
max_headers = {MAX_HEADERS}

[store]
url = "memory://"
seed = "tenants.toml"
"""


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    """A recording upstream that answers once a request is complete (modules whose
    upstream answers on the head override this)."""
    server = RecordingUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def acme_gateway(
    gateway_factory: GatewayFactory, upstream: RecordingUpstream, issue_key: IssueKey
) -> Gateway:
    """A gateway with ``ACME_CONFIG`` (small head limits) in front of ``upstream``, whose
    store holds the Fleet tenant ``acme``."""
    acme = issue_key(tier="fleet", sub="acme")
    tenants = f'[[tenants]]\nid = "acme"\nkeys = ["{acme}"]\n'
    return await gateway_factory(upstream.port, tenants=tenants, extra=ACME_CONFIG)


@pytest.fixture
def enforcer(config: Config, tmp_path: Path) -> Iterator[Enforcer]:
    """A real enforcer of the operations app on the shipped configuration (memory store),
    for driving the protocols without sockets (``tests/proxy/fake.py``)."""
    metrics = Metrics()
    events = EventLog(f"file://{tmp_path / 'events.jsonl'}", metrics)
    shared = Shared(config, metrics, events, MemoryStore("memory://", config.keyring))
    yield Enforcer("operations", config, shared)
    events.close()


@pytest.fixture
async def wire(enforcer: Enforcer) -> AsyncIterator[Wire]:
    """A client connection to the operations app, upstream connections on fake transports."""
    connection = Wire(enforcer)
    yield connection
    await connection.close()
