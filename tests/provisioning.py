"""Signed calls as billing makes them: a JSON body with a ``Gateway-Signature`` header
(``gateway.provision.sign``), for a gateway's provisioning hook and the issuer's order API.

    status, answer = await provision(session, gateway, event("license", key=token))
    status, answer = await signed_call(session, "GET", issuer_url, secret=BILLING_SECRET)

The ``provision_secret`` fixture (tests/conftest.py) gives a gateway ``SECRET`` as its
``GATEWAY_PROVISION_SECRET``."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import aiohttp

from gateway.provision import sign
from tests.harness import Gateway

SECRET = "billing-shared-secret"


def signature(raw: bytes, secret: str = SECRET, t: int | None = None) -> str:
    """The ``Gateway-Signature`` header value for ``raw``, made at ``t`` (default: now)."""
    return sign(secret.encode(), raw, int(time.time()) if t is None else t)


async def signed_call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    *,
    secret: str = SECRET,
    t: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """``body`` as JSON (none when ``None``), signed with ``secret``: (status, JSON answer)."""
    raw = b"" if body is None else json.dumps(body).encode()
    headers = {"Gateway-Signature": signature(raw, secret, t)}
    async with session.request(method, url, data=raw, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def provision(
    session: aiohttp.ClientSession,
    gateway: Gateway,
    body: dict[str, Any],
    *,
    secret: str = SECRET,
    t: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the gateway's provisioning hook, as billing does."""
    url = gateway.admin_url("/admin/provision")
    return await signed_call(session, "POST", url, body, secret=secret, t=t)


def event(action: str, tenant: str = "acme", **fields: Any) -> dict[str, Any]:
    """A provisioning event with a fresh ``event_id``."""
    return {"event_id": str(uuid.uuid4()), "action": action, "tenant": tenant, **fields}
