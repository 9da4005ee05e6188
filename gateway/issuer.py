"""The issuing service: ``gateway issuer serve --config issuer.toml``.

A separate process and the only one holding the private signing key. Billing posts
orders; the service maps their SKUs to a plan (``gateway.skus``), mints the license with
the tenant's next serial from its ledger, writes the audit line, and delivers the license
to every configured target (``gateway.delivery``). Every ``/v1`` call is signed like the
provisioning hook (``Gateway-Signature``, verified by ``gateway.provision``) with one of
the ``[[billing]]`` secrets; the key id that verifies is the audit actor.

    POST /v1/orders                      201 minted, 200 the same order again, 409 another
                                         order under that id, 422 refused by the matrix
    GET  /v1/orders/{order_id}           the license and its delivery state per target
    GET  /v1/licenses/{license_id}       the same for a license id (its order_id says whence)
    POST /v1/orders/{order_id}/retry     dead-lettered deliveries back to pending
    GET  /v1/dead-letters                every dead-lettered delivery
    GET  /healthz                        unauthenticated liveness, with the pid
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from gateway.audit import AuditError, AuditLog
from gateway.delivery import Deliveries
from gateway.issuer_config import IssuerConfig
from gateway.issuing import (
    BadOrder,
    Order,
    Terms,
    build,
    issued_record,
    order_digest,
    parse_order,
    parse_when,
)
from gateway.ledger import Delivery, Ledger, LedgerError, LedgerLicense, OrderConflict
from gateway.license import decode_unverified
from gateway.problems import PROBLEM_CONTENT_TYPE, problem_body
from gateway.provision import MAX_BODY_BYTES, ProvisionError, verify_signature
from gateway.signing_keys import KeyStateError, signing_key
from gateway.skus import OrderRefused, check_grandfather, resolve

log = logging.getLogger(__name__)

STATE: web.AppKey[Issuer] = web.AppKey("issuer")


class Refusal(Exception):
    """An answer other than success: status, stable code and problem+json fields."""

    def __init__(self, status: int, code: str, detail: str, **fields: Any) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.fields = fields
        super().__init__(detail)


class Issuer:
    """The service's state: config, ledger, audit log and the delivery worker."""

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self.ledger = Ledger(config.ledger_path)
        self.audit = AuditLog(config.audit_path)
        self.deliveries = Deliveries(config, self.ledger, self.audit)

    def caller(self, header: str | None, body: bytes) -> str:
        """The billing key id whose secret signed the request (the audit actor)."""
        first: ProvisionError | None = None
        configured = False
        for billing in self.config.settings.billing:
            secret = os.environ.get(billing.secret_env, "")
            if not secret:
                continue
            configured = True
            try:
                verify_signature(secret.encode(), header, body, time.time())
            except ProvisionError as exc:
                first = first or exc
                continue
            return billing.key_id
        if not configured:
            names = ", ".join(f"${b.secret_env}" for b in self.config.settings.billing)
            raise Refusal(503, "ordering_disabled", f"no billing secret is set ({names})")
        assert first is not None
        raise Refusal(401, first.code, first.detail)

    def mint(self, order: Order, actor: str) -> tuple[LedgerLicense, bool]:
        """Resolve, mint and record one order (runs in a thread: SQLite, fsync)."""
        settings = self.config.settings
        digest = order_digest(order)
        existing = self.ledger.existing(order.order_id, digest)
        if existing is not None:  # answered before the SKUs are looked at: the matrix may
            return existing, False  # have changed since, the order has not
        try:
            plan = resolve(self.config.catalog, self.config.matrix, order.lines())
        except OrderRefused as exc:
            raise Refusal(422, "order_refused", exc.detail, sku=exc.sku, rule=exc.rule) from exc
        if order.grandfather_tier is not None:
            try:
                check_grandfather(self.config.matrix, plan.tier, order.grandfather_tier)
            except OrderRefused as exc:
                raise Refusal(
                    422, "order_refused", exc.detail, rule=exc.rule, field="grandfather_tier"
                ) from exc
        if order.seats is not None:
            plan = msgspec.structs.replace(plan, seats=order.seats)
        if order.trial:  # a trial runs trial_days, whatever term the tier SKU sells
            plan = msgspec.structs.replace(plan, days=None)
        try:
            key, kid = signing_key(self.config.keys_dir)
        except (KeyStateError, OSError, ValueError) as exc:
            raise Refusal(503, "no_signing_key", str(exc)) from exc
        terms = Terms(
            tenant=order.tenant,
            plan=plan,
            issuer=settings.issuer.name,
            actor=actor,
            now=int(time.time()),
            starts_at=None if order.starts_at is None else parse_when(order.starts_at, ""),
            ends_at=None if order.ends_at is None else parse_when(order.ends_at, ""),
            days=settings.issuer.trial_days if order.trial else settings.issuer.default_days,
            trial=order.trial,
            order_id=order.order_id,
            grandfather_tier=order.grandfather_tier,
            grandfather_until=None
            if order.grandfather_until is None
            else parse_when(order.grandfather_until, ""),
        )
        return self.ledger.mint(
            order.tenant,
            lambda serial, held: build(terms, self.config.matrix, serial, held, key, kid),
            lambda lic: self.audit.append(issued_record(lic, None)),
            order=(order.order_id, digest),
            targets=tuple(target.name for target in settings.targets),
            # The order's handler makes the first attempt; the retry loop only takes over
            # if that one never reports (the process stopped in between).
            deliver_at=time.time() + 2 * settings.delivery.timeout_seconds,
        )


def view(lic: LedgerLicense, deliveries: list[Delivery]) -> dict[str, Any]:
    claims = decode_unverified(lic.token)[1]  # the ledger keeps no grandfather columns
    return {
        "order_id": lic.order_id,
        "tenant": lic.tenant,
        "license_id": lic.license_id,
        "serial": lic.serial,
        "kid": lic.kid,
        "fingerprint": lic.fingerprint,
        "tier": lic.tier,
        "addons": list(lic.addons),
        "seats": msgspec.to_builtins(lic.seats),
        "trial": lic.trial,
        "nbf": lic.nbf,
        "exp": lic.exp,
        "grandfather_tier": claims.get("grandfather_tier"),
        "grandfather_until": claims.get("grandfather_until"),
        "change": lic.change,
        "key": lic.token,
        "deliveries": [
            {
                "target": d.target,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "delivered_at": d.delivered_at,
            }
            for d in deliveries
        ],
    }


async def _body(request: web.Request) -> tuple[bytes, str]:
    body = await request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise Refusal(413, "body_too_large", f"over {MAX_BODY_BYTES} bytes")
    return body, request.app[STATE].caller(request.headers.get("Gateway-Signature"), body)


async def _order_view(issuer: Issuer, order_id: str) -> dict[str, Any]:
    found = await asyncio.to_thread(issuer.ledger.order, order_id)
    if found is None:
        raise Refusal(404, "order_unknown", f"no order {order_id!r}")
    return view(*found)


async def post_order(request: web.Request) -> web.Response:
    issuer = request.app[STATE]
    body, billing_key = await _body(request)
    try:
        order = parse_order(body)
    except BadOrder as exc:
        raise Refusal(400, "bad_body", exc.detail, field=exc.field) from exc
    try:
        lic, created = await asyncio.to_thread(issuer.mint, order, f"billing:{billing_key}")
    except OrderConflict as exc:
        raise Refusal(
            409, "order_conflict", f"order {order.order_id!r} was placed with another body"
        ) from exc
    except BadOrder as exc:
        raise Refusal(422, "order_refused", exc.detail, field=exc.field, rule="dates") from exc
    except AuditError as exc:
        raise Refusal(503, "audit_unavailable", str(exc)) from exc
    except LedgerError as exc:
        raise Refusal(503, "ledger_unavailable", str(exc)) from exc
    if created:
        log.info("order %s: %s %s for %s", order.order_id, lic.change, lic.tier, lic.tenant)
        await issuer.deliveries.deliver_new(lic)
    return web.json_response(
        await _order_view(issuer, order.order_id), status=201 if created else 200
    )


async def get_order(request: web.Request) -> web.Response:
    await _body(request)
    return web.json_response(await _order_view(request.app[STATE], request.match_info["order_id"]))


async def get_license(request: web.Request) -> web.Response:
    issuer = request.app[STATE]
    await _body(request)
    license_id = request.match_info["license_id"]
    found = await asyncio.to_thread(issuer.ledger.license_deliveries, license_id)
    if found is None:
        raise Refusal(404, "license_unknown", f"no license {license_id!r} in the ledger")
    return web.json_response(view(*found))


async def retry_order(request: web.Request) -> web.Response:
    issuer = request.app[STATE]
    await _body(request)
    order_id = request.match_info["order_id"]
    found = await asyncio.to_thread(issuer.ledger.order, order_id)
    if found is None:
        raise Refusal(404, "order_unknown", f"no order {order_id!r}")
    count = await asyncio.to_thread(issuer.ledger.retry, found[0].license_id)
    issuer.deliveries.wake.set()
    return web.json_response({"requeued": count})


async def dead_letters(request: web.Request) -> web.Response:
    issuer = request.app[STATE]
    await _body(request)
    dead = await asyncio.to_thread(issuer.ledger.deliveries, "dead")
    return web.json_response({"dead_letters": [msgspec.to_builtins(d) for d in dead]})


async def healthz(request: web.Request) -> web.Response:
    # the pid: a supervisor (``make demo``) checks the port is held by the process it started
    return web.json_response({"status": "ok", "pid": os.getpid()})


@web.middleware
async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except Refusal as exc:
        body = problem_body(
            exc.status,
            exc.code,
            "Order refused" if exc.status == 422 else "Request refused",
            exc.detail,
            **{name: value for name, value in exc.fields.items() if value is not None},
        )
        return web.Response(body=body, status=exc.status, content_type=PROBLEM_CONTENT_TYPE)
    return response


def issuer_app(config: IssuerConfig) -> web.Application:
    app = web.Application(middlewares=[problems], client_max_size=MAX_BODY_BYTES + 1)
    issuer = Issuer(config)
    app[STATE] = issuer

    async def worker(app: web.Application) -> AsyncIterator[None]:
        await issuer.deliveries.start()
        task = asyncio.get_running_loop().create_task(issuer.deliveries.run(), name="delivery")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await issuer.deliveries.close()

    app.cleanup_ctx.append(worker)
    app.router.add_post("/v1/orders", post_order)
    app.router.add_get("/v1/orders/{order_id}", get_order)
    app.router.add_post("/v1/orders/{order_id}/retry", retry_order)
    app.router.add_get("/v1/licenses/{license_id}", get_license)
    app.router.add_get("/v1/dead-letters", dead_letters)
    app.router.add_get("/healthz", healthz)
    return app


def serve(config: IssuerConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    from gateway.runtime import split_host_port

    host, port = split_host_port(config.settings.issuer.listen)
    listen = config.settings.issuer.listen
    log.info("issuer: listening on %s, ledger %s", listen, config.ledger_path)
    web.run_app(issuer_app(config), host=host, port=port, print=None, access_log=None)
