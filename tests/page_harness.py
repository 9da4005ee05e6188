"""A harness for testing the static plan page in a real browser before the proxy serves it.

``PlanPageServer`` is a tiny aiohttp server on loopback (in its own thread, since the
Playwright tests use its synchronous API) that stands where the gateway's tenant endpoints
will be: it serves the page assets from ``gateway.page``, answers ``GET {prefix}`` with the
body ``gateway.entitlements`` builds, and ``POST {prefix}/events`` through
``gateway.clicks`` — our real code behind it, only the HTTP wiring is the harness's.
Identity comes from request headers, as the front layer would set them (the browser
context adds them to every request).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.clicks import MAX_EVENT_BYTES, ClickLimiter, upgrade_click
from gateway.config import Settings
from gateway.decision import Decision, Policy
from gateway.entitlements import (
    Caller,
    UpsellMode,
    build_entitlements,
    encode_entitlements,
    identify,
    not_modified,
    parse_query,
    response_headers,
)
from gateway.errors import RequestError
from gateway.license import License, Seats
from gateway.matrix import AppName
from gateway.page import PAGE_HEADERS, page_assets
from gateway.problems import problem_body, request_id
from tests.harness import start_app

_VARY = ("X-Tenant-Id", "X-User-Role", "X-User-Id")


class PlanPageServer:
    """Serves the plan page and its API for the tenants in ``licenses`` (by tenant id)."""

    def __init__(
        self,
        settings: Settings,
        policy: Policy,
        licenses: Mapping[str, License],
        upsell: Mapping[AppName, UpsellMode],
        usage: Seats | None = None,
    ) -> None:
        self.prefix = settings.entitlements.prefix
        self.policy = policy
        self.licenses = licenses
        self.upsell = upsell
        self.usage = usage
        self.assets = page_assets(settings)
        self.limiter = ClickLimiter()
        self.events: list[dict[str, Any]] = []  # upgrade_click events accepted
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get(self.prefix, self._entitlements)
        app.router.add_post(f"{self.prefix}/events", self._event)
        app.router.add_get(f"{self.prefix}/{{name}}", self._asset)
        self._runner, self.port = await start_app(app)

    def _caller(self, request: web.Request) -> Caller | Decision:
        lic = self.licenses.get(request.headers.get("X-Tenant-Id", ""))
        role = request.headers.get("X-User-Role")
        return identify(self.policy, lic, None, role, request.headers.get("X-User-Id"), time.time())

    async def _entitlements(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if isinstance(caller, Decision):
            return _problem(caller.status, caller.code, caller.title, caller.detail)
        try:
            app = parse_query(request.query_string)
        except RequestError as exc:
            return _problem(exc.status, exc.code, exc.title, exc.detail)
        body = build_entitlements(
            self.policy, caller, upsell=self.upsell, app=app, usage=self.usage
        )
        encoded = encode_entitlements(body)
        headers = dict(response_headers(encoded.etag, _VARY))
        if not_modified(request.headers.get("If-None-Match"), encoded.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=encoded.body, content_type="application/json", headers=headers)

    async def _event(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if isinstance(caller, Decision):
            return _problem(caller.status, caller.code, caller.title, caller.detail)
        body = await request.content.read(MAX_EVENT_BYTES + 1)
        try:
            fields = upgrade_click(
                body,
                request.headers.get("Content-Type"),
                self.policy.matrix,
                caller,
                "operations",
                self.limiter,
            )
        except RequestError as exc:
            return _problem(exc.status, exc.code, exc.title, exc.detail, exc.headers)
        self.events.append(fields)
        return web.Response(status=202)

    async def _asset(self, request: web.Request) -> web.Response:
        found = self.assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        content_type, body = found
        return web.Response(body=body, headers={"Content-Type": content_type, **dict(PAGE_HEADERS)})


def _problem(
    status: int, code: str, title: str, detail: str, headers: tuple[tuple[str, str], ...] = ()
) -> web.Response:
    body = problem_body(status, code, title, detail, request_id=request_id())
    return web.Response(
        status=status,
        body=body,
        headers={"Content-Type": "application/problem+json", **dict(headers)},
    )
