"""The admin listener (default 127.0.0.1:9900): ``/metrics``, ``/healthz``, ``/readyz``.

Plain aiohttp: nothing here is on the request hot path. It never listens on a tenant-facing
address unless an operator configures it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.audit import AuditLog
from gateway.enforcer import PROBLEM_TYPE
from gateway.metrics import multiprocess_dir
from gateway.provision import (
    MAX_BODY_BYTES,
    ProvisionError,
    apply_event,
    parse_event,
    verify_signature,
)
from gateway.store import StoreError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from gateway.runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")


async def metrics(request: web.Request) -> web.Response:
    """This process's metrics, or with ``--workers N`` (prometheus-client multiprocess
    mode) the sum over every worker, whichever worker answers the scrape."""
    runtime = request.app[RUNTIME]
    runtime.metrics.flush()
    registry = runtime.metrics.registry
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once config is loaded and every upstream accepts connections."""
    runtime = request.app[RUNTIME]
    pools = runtime.pools
    accepting = await asyncio.gather(
        *(_accepts(pool.host, pool.port, pool.settings.connect_timeout) for pool in pools.values())
    )
    upstreams = dict(zip(pools, accepting, strict=True))
    store_up = await runtime.store.ping()
    ready = runtime.started and not runtime.tracker.closing and all(upstreams.values())
    if runtime.config.settings.store.required_for_ready:
        ready = ready and store_up
    body = {
        "ready": ready,
        "config": {
            "routes": runtime.shared.rules.routes.sha,
            "matrix": runtime.shared.rules.matrix.sha,
        },
        "upstreams": upstreams,
        # A store outage does not fail readiness by default: the gateway keeps serving
        # from its cache and from keys in headers.
        "store": "up" if store_up else "down",
        "draining": runtime.tracker.closing,
    }
    return web.json_response(body, status=200 if ready else 503)


async def _accepts(host: str, port: int, timeout: float) -> bool:
    """Does the upstream accept a connection now? A fresh one, closed at once: the pool's
    flag only remembers that it once did, and a probe through the pool would count
    against its connection cap."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def provision(request: web.Request) -> web.Response:
    """The billing hook (see ``gateway.provision``): 200 ``{"applied": bool}``, 401 bad or
    stale signature, 400 bad body naming the field, 503 store unreachable or no secret."""
    runtime = request.app[RUNTIME]
    secret_env = runtime.config.settings.admin.provision_secret_env
    secret = os.environ.get(secret_env, "")
    try:
        if not secret:
            raise ProvisionError(
                503, "provisioning_disabled", f"set the secret in ${secret_env} to enable it"
            )
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise ProvisionError(413, "body_too_large", f"over {MAX_BODY_BYTES} bytes")
        verify_signature(
            secret.encode(), request.headers.get("Gateway-Signature"), body, time.time()
        )
        event = parse_event(body)
        shared = runtime.shared
        audit_log = runtime.config.settings.audit.log
        try:
            applied = await apply_event(
                event,
                runtime.store,
                shared.licenses.keyring,
                shared.rules.matrix,
                runtime.events,
                shared.rules.revision,
                AuditLog(runtime.config.resolve(audit_log)) if audit_log else None,
            )
        except StoreError as exc:
            runtime.metrics.store_errors.labels(op="provision").inc()
            raise ProvisionError(503, "store_unavailable", str(exc)) from exc
    except ProvisionError as exc:
        payload: dict[str, object] = {
            "type": PROBLEM_TYPE + exc.code,
            "title": "Provisioning refused",
            "status": exc.status,
            "code": exc.code,
            "detail": exc.detail,
        }
        if exc.field is not None:
            payload["field"] = exc.field
        return web.json_response(
            payload, status=exc.status, content_type="application/problem+json"
        )
    runtime.shared.tenants.invalidate(event.tenant)
    log.info(
        "provision %s %s for %s: applied=%s", event.event_id, event.action, event.tenant, applied
    )
    return web.json_response({"applied": applied})


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1)
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/admin/provision", provision)
    return app
