"""Calls to the issuing service's ``/v1`` API as billing makes them, signed with a billing
secret (``Gateway-Signature``, ``gateway.provision.sign``). ``gateway migrate --issuer``
places its orders through it.

    async with aiohttp.ClientSession() as session:
        issuer = IssuerClient("http://127.0.0.1:9800", secret, session)
        answer = await issuer.place(order)          # the license body; IssuerError if not
        found = await issuer.license(license_id)    # the same for a license id, or None
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from gateway.issuing import Order
from gateway.provision import sign

TIMEOUT_SECONDS = 30.0  # an order is minted, recorded and delivered before it is answered


class IssuerError(Exception):
    """The issuer refused (``status`` and ``code`` of its problem+json answer) or did not
    answer (``status`` None: whether it minted is unknown)."""

    def __init__(self, detail: str, status: int | None = None, code: str | None = None) -> None:
        self.detail = detail
        self.status = status
        self.code = code
        super().__init__(detail)


class IssuerClient:
    __slots__ = ("base", "secret", "session")

    def __init__(self, base: str, secret: bytes, session: aiohttp.ClientSession) -> None:
        self.base = base.rstrip("/")
        self.secret = secret
        self.session = session

    async def _call(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        headers = {"Gateway-Signature": sign(self.secret, body, int(time.time()))}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(
                method,
                self.base + path,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS),
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IssuerError(
                f"the issuer at {self.base} did not answer ({str(exc) or type(exc).__name__})"
            ) from exc
        try:
            return status, msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise IssuerError(
                f"the issuer at {self.base} answered {status} without JSON", status
            ) from exc

    @staticmethod
    def _refused(status: int, answer: Any, what: str) -> IssuerError:
        if not isinstance(answer, dict):
            return IssuerError(f"{what}: {status}", status)
        rule = f", rule {answer['rule']}" if answer.get("rule") else ""
        sku = f"SKU {answer['sku']!r}: " if answer.get("sku") else ""
        return IssuerError(
            f"{what}: {status} {answer.get('code')}{rule}: {sku}{answer.get('detail')}",
            status,
            answer.get("code"),
        )

    async def place(self, order: Order) -> dict[str, Any]:
        """``POST /v1/orders``: the license body (201 minted, 200 the same order again)."""
        status, answer = await self._call("POST", "/v1/orders", msgspec.json.encode(order))
        if status not in (200, 201) or not isinstance(answer, dict):
            raise self._refused(status, answer, f"the issuer refused order {order.order_id}")
        return answer

    async def license(self, license_id: str) -> dict[str, Any] | None:
        """``GET /v1/licenses/{id}``: the license body, or None when its ledger lacks it."""
        status, answer = await self._call("GET", f"/v1/licenses/{quote(license_id, safe='')}")
        if status == 404:
            return None
        if status != 200 or not isinstance(answer, dict):
            raise self._refused(status, answer, f"the issuer could not show license {license_id}")
        return answer
