"""The admin listener (default 127.0.0.1:9900): ``/metrics``, ``/healthz``, ``/readyz``.

Plain aiohttp: nothing here is on the request hot path. It never listens on a tenant-facing
address unless an operator configures it to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from gateway.runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    body = generate_latest(runtime.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once config is loaded and every upstream accepts connections."""
    runtime = request.app[RUNTIME]
    upstreams = {}
    for app, pool in runtime.pools.items():
        upstreams[app] = pool.reachable or await pool.probe()
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


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
