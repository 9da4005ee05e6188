"""Fixtures of the proxy tests: a recording upstream and a gateway in front of it whose
store holds one tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import GatewayFactory, IssueKey
from tests.harness import Gateway
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
