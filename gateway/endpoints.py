"""The tenant-facing endpoints under ``[entitlements] prefix``, answered by the gateway itself
on every app listener: never forwarded, never gated by ``routes.toml`` (README, Entitlements
API and plan page).

* ``GET {prefix}`` — the caller's plan (``gateway.entitlements``), with ``ETag`` and
  ``If-None-Match`` → 304; the caller is resolved like any request (401 without a license).
  With ``[seats] mode = "active_users"`` its seats are the ones admission counts
  (``gateway.seats.seats_view``): when the seat book holds no recent count of the tenant,
  ``respond`` sets ``head.waiting = (WAIT_SEATS, tenant)`` and answers None; the enforcer
  awaits ``SeatBook.count_held`` into ``head.state`` and asks again.
* ``POST {prefix}/events`` — an ``upgrade_click``: ``COLLECT`` (the relay reads at most
  ``MAX_EVENT_BYTES + 1`` bytes of body), then ``Enforcer.answer`` validates it
  (``gateway.clicks``), emits the event and answers 202.
* ``GET {prefix}/ui``, ``ui.css``, ``ui.js``, ``openapi.json`` — the plan page and the API
  description (``gateway.page``), served from memory, no license needed (they hold no
  tenant data: the page fetches ``{prefix}`` with the session's headers).

Anything else under the prefix is 404 ``not_found``; a method an endpoint does not take is
405 ``method_not_allowed`` with ``Allow``.

    endpoints = TenantEndpoints("operations", config, shared)
    found = endpoints.route("GET", "/_entitlements")   # ENTITLEMENTS, EVENTS or a Verdict
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from gateway.clicks import MAX_EVENT_BYTES, upgrade_click
from gateway.config import Config
from gateway.decision import Decision, TenantRecord
from gateway.entitlements import (
    Caller,
    build_entitlements,
    encode_entitlements,
    identify,
    not_modified,
    parse_query,
    response_headers,
)
from gateway.errors import LicenseError, RequestError
from gateway.license import License
from gateway.matrix import AppName
from gateway.openapi import encode_openapi
from gateway.page import PAGE_HEADERS, page_assets
from gateway.problems import request_id
from gateway.seats import HeldSeats, seats_view
from gateway.verdict import COLLECT, RESPOND, RequestHead, Verdict

if TYPE_CHECKING:
    from gateway.answers import Answers
    from gateway.enforcer import Rules, Shared

ENTITLEMENTS: Final = "entitlements"
EVENTS: Final = "events"
WAIT_SEATS: Final = "seats_held"  # head.waiting: count the tenant's seats held first
JSON: Final = b"application/json"
OPENAPI: Final = "openapi.json"


def _lines(headers: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers)


_PAGE_HEADERS = _lines(PAGE_HEADERS)


def _asset(content_type: str, body: bytes) -> Verdict:
    verdict = Verdict(RESPOND, 200, body, b"", b"", _PAGE_HEADERS, "tenant_api")
    verdict.content_type = content_type.encode()
    verdict.code = "asset"
    return verdict


class TenantEndpoints:
    """The tenant endpoints of one app listener."""

    def __init__(self, app: AppName, config: Config, shared: Shared, answers: Answers) -> None:
        self.app = app
        self.shared = shared
        self.answers = answers  # refusals: body, metric and event like any other
        settings = config.settings
        self.prefix = settings.entitlements.prefix
        self.metrics = shared.metrics.for_app(app)
        # The body depends on who asks: every header that identifies the caller.
        lic = settings.license
        vary = [lic.header, lic.tenant_header, lic.role_header, lic.user_header]
        if settings.identity is not None and settings.identity.mode == "jwt":
            vary.append(settings.identity.header)
        self.vary = tuple(vary)
        self.upsell = {name: app_settings.upsell for name, app_settings in settings.apps.items()}
        # active_users mode: seats as the seat book counts them (else as recorded)
        self.seat_book = shared.seats if settings.seats.mode == "active_users" else None
        self._settings = settings
        self._assets: dict[str, Verdict] = {}
        self._documented = config.matrix  # the matrix openapi.json lists the names of
        for name, (content_type, body) in page_assets(settings, config.matrix).items():
            self._assets[name] = _asset(content_type, body)

    def under_prefix(self, path: str) -> bool:
        """Is ``path`` (canonical) the prefix or below it?"""
        prefix = self.prefix
        return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")

    def route(self, head: RequestHead, path: str) -> str | Verdict:
        """``ENTITLEMENTS`` or ``EVENTS`` (the caller must be resolved first), or the
        answer itself: a page asset, 404, 405."""
        name = path[len(self.prefix) + 1 :]
        method = head.method
        if path == self.prefix:
            return ENTITLEMENTS if method in ("GET", "HEAD") else self._not_allowed(head, "GET")
        if name == "events":
            return EVENTS if method == "POST" else self._not_allowed(head, "POST")
        asset = self._assets.get(name)
        if name == OPENAPI and self.shared.rules.matrix is not self._documented:
            # A reload swapped the matrix: the document lists the features clicks accept.
            self._documented = matrix = self.shared.rules.matrix
            body = encode_openapi(self._settings, matrix)
            asset = self._assets[OPENAPI] = _asset(JSON.decode(), body)
        if asset is not None:
            return asset if method in ("GET", "HEAD") else self._not_allowed(head, "GET")
        return self._refuse(
            404, "not_found", "Not found", f"no such endpoint under {self.prefix}", head
        )

    def respond(
        self,
        endpoint: str,
        head: RequestHead,
        presented: License | LicenseError | None,
        record: TenantRecord | None,
        role: str | None,
        user: str | None,
        rules: Rules,
        now: float,
    ) -> Verdict | Decision | None:
        """The answer of ``GET {prefix}``, or ``COLLECT`` for ``POST {prefix}/events``; a
        ``Decision`` when the caller has no valid license (the enforcer answers it as any
        refusal); None when the seats held are to be counted first (``head.waiting``)."""
        caller = identify(rules.policy, presented, record, role, user, now)
        if isinstance(caller, Decision):
            return caller
        if endpoint == EVENTS:
            head.state = caller
            verdict = Verdict(RESPOND, 0, b"", b"", b"", b"", "tenant_api")
            verdict.kind = COLLECT
            verdict.max_body = MAX_EVENT_BYTES + 1
            verdict.tenant = caller.license.claims.sub
            return verdict
        mark = head.target.find(b"?")
        query = head.target[mark + 1 :].decode("latin-1") if mark >= 0 else ""
        try:
            app = parse_query(query)
        except RequestError as exc:
            return self._error(head, exc)
        usage = record.usage if record is not None else None
        seats = None
        book = self.seat_book
        if book is not None:
            tenant = caller.license.claims.sub
            # Counted during this request's wait, or recently enough for a polling UI.
            held = head.state if head.state.__class__ is HeldSeats else book.held(tenant, now)
            if held is None:
                head.waiting = (WAIT_SEATS, tenant)
                return None
            seats = seats_view(rules.matrix, book.settings, caller.plan, held, usage)
        body = build_entitlements(
            rules.policy, caller, upsell=self.upsell, app=app, usage=usage, seats=seats
        )
        encoded = encode_entitlements(body)
        headers = _lines(response_headers(encoded.etag, self.vary))
        match = head.if_none_match or head.header(b"if-none-match")
        self.metrics.outcome["tenant_api"].inc()
        if not_modified(match.decode("latin-1") if match is not None else None, encoded.etag):
            verdict = Verdict(RESPOND, 304, b"", b"", b"", headers, "tenant_api")
        else:
            verdict = Verdict(RESPOND, 200, encoded.body, b"", b"", headers, "tenant_api")
        verdict.content_type = JSON
        verdict.tenant = caller.license.claims.sub
        verdict.tier = caller.plan.tier
        verdict.code = "entitlements"
        return verdict

    def answer(self, head: RequestHead, body: bytes) -> Verdict:
        """``POST {prefix}/events`` once its body is read: 202 and an ``upgrade_click``
        event, or the problem saying what was wrong with it."""
        caller = head.state
        assert isinstance(caller, Caller), "answer() follows a COLLECT verdict"
        content_type = head.content_type or head.header(b"content-type")
        rules = self.shared.rules
        try:
            fields = upgrade_click(
                body,
                content_type.decode("latin-1") if content_type is not None else None,
                rules.matrix,
                caller,
                self.app,
                self.shared.clicks,
            )
        except RequestError as exc:
            return self._error(head, exc)
        rid = head.request_id or request_id()
        self.shared.events.emit("upgrade_click", **fields, request_id=rid, revision=rules.revision)
        self.shared.attribution.click(fields["tenant"], fields["target"], time.time())
        self.metrics.outcome["tenant_api"].inc()
        verdict = Verdict(RESPOND, 202, b"", b"", b"", b"", "tenant_api")
        verdict.tenant = caller.license.claims.sub
        verdict.tier = caller.plan.tier
        verdict.code = "upgrade_click"
        return verdict

    def _error(self, head: RequestHead, exc: RequestError) -> Verdict:
        extra = _lines(exc.headers)
        outcome = "blocked" if exc.status in (403, 429) else "rejected"
        return self._refuse(exc.status, exc.code, exc.title, exc.detail, head, extra, outcome)

    def _not_allowed(self, head: RequestHead, allow: str) -> Verdict:
        detail = f"{head.method} is not allowed here (allowed: {allow})"
        extra = b"Allow: %s\r\n" % allow.encode()
        return self._refuse(405, "method_not_allowed", "Method not allowed", detail, head, extra)

    def _refuse(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        head: RequestHead,
        extra: bytes = b"",
        outcome: str = "rejected",
    ) -> Verdict:
        return self.answers.refuse(status, code, title, detail, head, outcome, extra)
