"""The admin listener (default 127.0.0.1:9900): ``/metrics``, ``/healthz``, ``/readyz``.

Plain aiohttp: nothing here is on the request hot path. It never listens on a tenant-facing
address unless an operator configures it to.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.metrics import multiprocess_dir

if TYPE_CHECKING:
    from gateway.runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")


async def metrics(request: web.Request) -> web.Response:
    """This process's metrics, or with ``--workers N`` (prometheus-client multiprocess
    mode) the sum over every worker, whichever worker answers the scrape."""
    runtime = request.app[RUNTIME]
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
    ready = runtime.started and not runtime.tracker.closing and all(upstreams.values())
    body = {
        "ready": ready,
        "config": {
            "routes": runtime.shared.rules.routes.sha,
            "matrix": runtime.shared.rules.matrix.sha,
        },
        "upstreams": upstreams,
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


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
