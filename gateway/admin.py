"""The admin listener (default 127.0.0.1:9900): ``/metrics``, ``/healthz``, ``/readyz``,
``/admin/config`` and the billing hook ``/admin/provision``.

Plain aiohttp: nothing here is on the request hot path. It never listens on a tenant-facing
address unless an operator configures it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.audit import AuditLog
from gateway.metrics import multiprocess_dir, multiprocess_registry
from gateway.problems import PROBLEM_CONTENT_TYPE, problem_body
from gateway.provision import (
    MAX_BODY_BYTES,
    ProvisionError,
    apply_event,
    parse_event,
    read_body,
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
        registry = multiprocess_registry()
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers. The pid tells a supervisor (``make demo``) that the
    process answering on this port is the one it started."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


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
    """The billing hook (see ``gateway.provision``): 200 ``{"applied": true}`` or
    ``{"applied": false, "reason": …}``, 401 bad or
    stale signature, 400 bad body naming the field, 503 store unreachable or no secret."""
    runtime = request.app[RUNTIME]
    secret_env = runtime.config.settings.admin.provision_secret_env
    secret = os.environ.get(secret_env, "")
    try:
        if not secret:
            raise ProvisionError(
                503, "provisioning_disabled", f"set the secret in ${secret_env} to enable it"
            )
        body = await read_body(request.content, request.content_length)
        verify_signature(
            secret.encode(), request.headers.get("Gateway-Signature"), body, time.time()
        )
        event = parse_event(body)
        shared = runtime.shared
        audit_log = runtime.config.audit_log
        try:
            outcome = await apply_event(
                event,
                runtime.store,
                shared.licenses.keyring,
                shared.rules.policy,
                runtime.events,
                shared.rules.revision,
                AuditLog(audit_log) if audit_log is not None else None,
                shared.attribution,
            )
        except StoreError as exc:
            runtime.metrics.store_errors.labels(op="provision").inc()
            raise ProvisionError(503, "store_unavailable", str(exc)) from exc
    except ProvisionError as exc:
        fields = {"field": exc.field} if exc.field is not None else {}
        body = problem_body(exc.status, exc.code, "Provisioning refused", exc.detail, **fields)
        return web.Response(body=body, status=exc.status, content_type=PROBLEM_CONTENT_TYPE)
    runtime.shared.tenants.invalidate(event.tenant)
    log.info(
        "provision %s %s for %s: %s",
        event.event_id,
        event.action,
        event.tenant,
        "applied" if outcome.applied else f"not applied ({outcome.reason})",
    )
    return web.json_response(outcome.body())


async def config(request: web.Request) -> web.Response:
    """What this process has loaded, for an operator comparing pods (small, like Envoy's
    ``config_dump``): revisions, key ids with fingerprints, apps, store and events. Never a
    secret: the store URL's password is masked, the provisioning secret only said to be set."""
    runtime = request.app[RUNTIME]
    cfg = runtime.config
    settings = cfg.settings
    rules = runtime.shared.rules
    keyring = runtime.shared.licenses.keyring
    apps: dict[str, Any] = {}
    rollout = rules.rollout
    for name, app in settings.apps.items():
        apps[name] = {
            **msgspec.structs.asdict(app),
            "unmatched": rules.routes.apps[name].unmatched,
            # as in force (it follows gateway.toml at every reload)
            "enforce": rollout.modes.get(name, app.enforce),
        }
    candidate = rollout.candidate
    live = runtime.reloaded_settings or settings
    body = {
        "version": __version__,
        "config_file": str(cfg.path),
        "revisions": {"routes": rules.routes.sha, "matrix": rules.matrix.sha},
        "files": {
            "routes": str(cfg.resolve(settings.files.routes)),
            "tier_matrix": str(cfg.resolve(settings.files.tier_matrix)),
        },
        "public_keys": {
            "folder": str(cfg.resolve(settings.license.public_keys)),
            "keys": [
                {"kid": kid, "fingerprint": public_key_fingerprint(key)}
                for kid, key in sorted(keyring.keys.items())
            ],
        },
        "apps": apps,
        "store": {
            "url": redact_url(cfg.store_url),
            "required_for_ready": settings.store.required_for_ready,
            "seed": settings.store.seed,
        },
        "events": {
            "sink": cfg.events_sink,
            "max_queue": settings.events.max_queue,
            "license_invalid_per_second": settings.events.license_invalid_per_second,
            "refusals_per_second": settings.events.refusals_per_second,
        },
        "admin": {
            "listen": settings.admin.listen,
            "provision_secret_env": settings.admin.provision_secret_env,
            "provisioning_enabled": bool(os.environ.get(settings.admin.provision_secret_env)),
        },
        # None without an [identity] section: tenant and role headers trusted from any peer.
        "identity": runtime.shared.identifier.describe(),
        "rollout": {
            "enforce_tenants": len(rollout.cohort),
            "enforce_tenants_file": live.rollout.enforce_tenants_file,
        },
        "candidate": None
        if candidate is None
        else {
            "routes": live.candidate.routes,
            "tier_matrix": live.candidate.tier_matrix,
            "revisions": {"routes": candidate.routes.sha, "matrix": candidate.matrix.sha},
        },
    }
    return web.json_response(body)


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    """``sha256:`` and the hex SHA-256 of the key's DER SubjectPublicKeyInfo, the same as
    ``openssl pkey -pubin -in KID.pub -outform DER | sha256sum``."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


_SECRET_QUERY_KEYS = ("password", "secret", "token")


def redact_url(url: str) -> str:
    """``url`` with the password of its user part and any password-like query value
    replaced by ``***`` (redis-py also takes ``?password=``). Edited as text: urllib's
    split and re-join would rewrite ``sqlite:////abs/path`` and ``memory://``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # up to the last "@" before the query: a password may hold an unescaped "/" or "@"
    head, qmark, query = rest.partition("?")
    if "@" in head:
        userinfo, host = head.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        if colon:
            head = f"{user}:***@{host}"
    if qmark:
        query, hash_, fragment = query.partition("#")
        pairs = []
        for pair in query.split("&"):
            key, equals, _ = pair.partition("=")
            if equals and any(word in key.lower() for word in _SECRET_QUERY_KEYS):
                pair = f"{key}=***"
            pairs.append(pair)
        head = f"{head}?{'&'.join(pairs)}{hash_}{fragment}"
    return f"{scheme}://{head}"


def admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1)
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/config", config)
    app.router.add_post("/admin/provision", provision)
    return app
