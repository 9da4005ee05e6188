"""One request's enforcement, without sockets: classic check, canonical path, route,
license (through caches), decision, and the answer or the headers for the upstream.

The proxy protocol fills a ``RequestHead`` while parsing and calls ``Enforcer.check``;
everything here is synchronous and allocation-light. The only wait (a tenant record the
cache does not hold) is signalled with ``NEED_TENANT`` so the caller can fetch it and ask
again. Rules (routes, matrix, policy) are read from ``Rules`` once per request, so a
reload never changes a request half-way.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import time
from random import random
from time import monotonic
from typing import Any, Final

import cachetools
import msgspec

from gateway.config import Config
from gateway.decision import Decision, Policy, TenantRecord, decide
from gateway.errors import LicenseError
from gateway.events import EventLog
from gateway.license import ClassicKeys, KeyRing, License
from gateway.matrix import AppName, TierMatrix
from gateway.metrics import AppMetrics, Metrics
from gateway.paths import PathRejected, canonical_path
from gateway.ratelimit import TokenBucket
from gateway.routes import AppRoutes, Match, RouteTable
from gateway.store import StoreError, TenantStore

log = logging.getLogger(__name__)

# Verdict kinds
FORWARD: Final = 1  # licensed or public: forward with rewritten headers
CLASSIC: Final = 2  # classic X Dispatch: forward untouched
RESPOND: Final = 3  # answer here (denial, bad request)
NEED_TENANT: Final = 4  # fetch the tenant record, then check again

PROBLEM_TYPE = "https://errors.gateway.local/"
_json = msgspec.json.Encoder()
_NO_TENANT = object()


class Rules:
    """The hot-reloadable part of the config, swapped as one reference."""

    __slots__ = ("matrix", "routes", "policy", "revision")

    def __init__(self, matrix: TierMatrix, routes: RouteTable, policy: Policy) -> None:
        self.matrix = matrix
        self.routes = routes
        self.policy = policy
        self.revision = f"{routes.sha}/{matrix.sha}"


class RequestHead:
    """What the parser saw of one request, kept as bytes until a decision needs text."""

    __slots__ = (
        "method",
        "target",
        "headers",
        "license_key",
        "license_count",
        "tenant",
        "role",
        "user",
        "bad_header",
    )

    def __init__(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes, bytes]]
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.license_key: bytes | None = None
        self.license_count = 0
        self.tenant: bytes | None = None
        self.role: bytes | None = None
        self.user: bytes | None = None
        self.bad_header: str | None = None


class Verdict:
    """What to do with one request."""

    __slots__ = (
        "kind",
        "status",
        "body",
        "target",
        "upstream_headers",
        "response_headers",
        "outcome",
    )

    def __init__(
        self,
        kind: int,
        status: int = 0,
        body: bytes = b"",
        target: bytes = b"",
        upstream_headers: bytes = b"",
        response_headers: bytes = b"",
        outcome: str = "allowed",
    ) -> None:
        self.kind = kind
        # For forwarded requests the outcome is counted when the upstream has answered,
        # so a request that then fails upstream counts once, as upstream_error.
        self.outcome = outcome
        self.status = status
        self.body = body
        self.target = target  # what the upstream receives as request target
        self.upstream_headers = upstream_headers  # added X-Entitlement-* lines
        self.response_headers = response_headers  # e.g. X-License-Warning


_CLASSIC_VERDICT = Verdict(CLASSIC, outcome="classic")
_NEED_TENANT_VERDICT = Verdict(NEED_TENANT)


class LicenseCache:
    """Verified keys by digest; keys whose signature failed, briefly (60 s); and a budget
    of signature checks per second, so a flood of never-seen keys cannot eat the core.

    Costs, in order: a cached key is one ``dict.get``; a malformed key or an unknown
    ``kid`` fails ``KeyRing.parse`` in microseconds and is not cached (recomputing is as
    cheap as caching); only a well-formed key pays an Ed25519 check (~70 µs), and only
    while the budget lasts — past it the key is answered 503 ``license_check_busy`` with
    ``Retry-After`` and not cached, so a legitimate new key gets in a moment later. Keys
    already verified are never affected by a flood.

    The maps are plain dicts bounded first-in-first-out: a hit costs one C-level get
    instead of cachetools' Python-level LRU bookkeeping (measured: the LRU get was the
    largest single cost of a cached check). A verified key stays verified, so recency buys
    little; the key ring changing clears everything."""

    def __init__(
        self,
        keyring: KeyRing,
        metrics: Metrics,
        size: int = 100_000,
        verifications_per_second: float = 2000.0,
    ) -> None:
        self.keyring = keyring
        self._size = size
        self._valid: dict[bytes, License] = {}
        self._invalid: dict[bytes, tuple[LicenseError, float]] = {}
        self._metrics = metrics
        self._budget = TokenBucket(verifications_per_second)

    def resolve(self, token: bytes) -> License | LicenseError:
        digest = hashlib.blake2b(token, digest_size=16).digest()
        found = self._valid.get(digest)
        if found is not None:
            self._metrics.cache_hit.inc()
            return found
        failed = self._invalid.get(digest)
        if failed is not None and failed[1] > monotonic():
            self._metrics.cache_hit.inc()
            return failed[0]
        self._metrics.cache_miss.inc()
        try:
            parsed = self.keyring.parse(token.decode("ascii"))
        except UnicodeDecodeError:
            return self._failed(LicenseError("license_malformed", "key is not ASCII"))
        except LicenseError as exc:
            return self._failed(exc)
        if not self._budget.take():
            busy = LicenseError("license_check_busy", "too many new license keys at once")
            return self._failed(busy)
        try:
            lic = self.keyring.check_signature(parsed)
        except LicenseError as exc:
            # Remember only the reason: the raised error holds a traceback and the chained
            # InvalidSignature (~2.6 KB each, measured under a forged-key flood).
            failed_error = LicenseError(exc.reason, exc.detail)
            bounded_put(self._invalid, digest, (failed_error, monotonic() + 60.0), 10_000)
            return self._failed(failed_error)
        self._metrics.license_result["valid"].inc()
        bounded_put(self._valid, digest, lic, self._size)
        return lic

    def _failed(self, error: LicenseError) -> LicenseError:
        self._metrics.license_result[error.reason].inc()
        return error

    def clear(self) -> None:
        self._valid.clear()
        self._invalid.clear()

    def __len__(self) -> int:
        return len(self._valid)


def bounded_put(mapping: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    """Insert, dropping the oldest entry when ``mapping`` holds ``size`` already."""
    if key not in mapping and len(mapping) >= size:
        del mapping[next(iter(mapping))]
    mapping[key] = value


class TenantCache:
    """Tenant records from the store for ``ttl`` seconds; misses go to the store
    asynchronously. Fail-static: when the store cannot answer, the last record known is
    kept (an outage never revokes), and a tenant never seen is treated as absent briefly.

    Entries are ``(record, expires_at)`` in a plain dict bounded first-in-first-out, read
    with one ``dict.get`` and one clock read on the hot path."""

    def __init__(
        self, store: TenantStore, metrics: Metrics, ttl: float = 5.0, size: int = 100_000
    ) -> None:
        self.store = store
        self.ttl = ttl
        self._size = size
        self._records: dict[str, tuple[TenantRecord | None, float]] = {}
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._errors = metrics.store_errors.labels(op="get")

    def cached(self, tenant: str) -> TenantRecord | None | object:
        """The cached record, None (known absent), or ``_NO_TENANT`` (not cached)."""
        entry = self._records.get(tenant)
        if entry is None or entry[1] < monotonic():
            return _NO_TENANT
        return entry[0]

    async def fetch(self, tenant: str) -> None:
        """Load one tenant; concurrent requests for the same tenant share one store read,
        which runs in a task of its own (held in ``_pending`` until done), so a client
        that goes away does not cancel it for the others."""
        pending = self._pending.get(tenant)
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._load(tenant))
            self._pending[tenant] = pending
            pending.add_done_callback(lambda _: self._pending.pop(tenant, None))
        await asyncio.shield(pending)

    async def _load(self, tenant: str) -> None:
        try:
            record = await self.store.get(tenant)
        except StoreError as exc:
            self._errors.inc()
            log.warning("tenant store: get %s failed: %s", tenant, exc)
            stale = self._records.get(tenant)
            self._put(tenant, stale[0] if stale is not None else None)
            return
        self._put(tenant, record)

    def _put(self, tenant: str, record: TenantRecord | None) -> None:
        # Jittered (80-120 % of the TTL): tenants cached together must not all expire, and
        # go back to the store, in the same instant.
        expires = monotonic() + self.ttl * (0.8 + 0.4 * random())
        bounded_put(self._records, tenant, (record, expires), self._size)

    def invalidate(self, tenant: str | None = None) -> None:
        if tenant is None:
            self._records.clear()
        else:
            self._records.pop(tenant, None)


class ClassicKeyCache:
    """For ``license.classic_keys = "store"``: which classic keys the store imported,
    remembered for ``ttl`` seconds (unknown ones too, so a flood cannot hammer the store)."""

    def __init__(self, store: TenantStore, metrics: Metrics, ttl: float = 60.0) -> None:
        self.store = store
        self.ttl = ttl
        self._known: cachetools.TTLCache[bytes, bool] = cachetools.TTLCache(100_000, ttl)
        self._errors = metrics.store_errors.labels(op="classic_key")

    def get(self, key: bytes) -> bool | None:
        return self._known.get(key)

    async def fetch(self, key: bytes) -> None:
        try:
            self._known[key] = await self.store.is_classic_key(key.decode("latin-1"))
        except StoreError as exc:
            self._errors.inc()
            log.warning("tenant store: classic key look-up failed: %s", exc)


_request_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-{int(time.time()):x}"


def request_id() -> str:
    return f"{_ID_PREFIX}-{next(_request_ids):x}"


def problem(
    status: int, code: str, title: str, detail: str = "", **fields: Any
) -> tuple[bytes, str]:
    """An RFC 9457 problem body (and its request id)."""
    rid = request_id()
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": title,
        "status": status,
        "code": code,
        "detail": detail,
    }
    body.update(fields)
    body["request_id"] = rid
    return _json.encode(body), rid


class Enforcer:
    """Enforcement for one app listener; shares caches and rules with the other apps."""

    def __init__(
        self,
        app: AppName,
        config: Config,
        shared: Shared,
    ) -> None:
        self.app = app
        self.shared = shared
        settings = config.settings.apps[app]
        self.classic_prefixes = tuple(settings.classic_path_prefixes)
        self.classic: ClassicKeys = config.classic
        self.classic_from_store = config.settings.license.classic_keys == "store"
        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self.metrics: AppMetrics = shared.metrics.for_app(app)

    def check(self, head: RequestHead, fetched: bool = False) -> Verdict:
        """The verdict for one request. ``NEED_TENANT`` asks the caller to ``prefetch``
        and call again with ``fetched=True`` (then a cache miss means "not in the store")."""
        rules = self.shared.rules
        m = self.metrics
        if head.bad_header is not None:
            return self._reject(400, "bad_header", "Bad request header", head.bad_header)
        token = head.license_key
        if token is not None and self.classic.is_classic(token.decode("latin-1")):
            if not self.classic_from_store:
                m.classic.inc()
                return _CLASSIC_VERDICT
            known = self.shared.classic_keys.get(token)
            if known is None:
                if not fetched:
                    return _NEED_TENANT_VERDICT
                # The store did not answer: an outage never refuses (fail-static), and
                # the classic application still validates its own keys.
                known = True
            if known:
                m.classic.inc()
                return _CLASSIC_VERDICT
            # A classic-looking key the store never imported buys nothing: it goes on as
            # an ordinary (and so malformed) license key.
        target = head.target
        query = b""
        mark = target.find(b"?")
        if mark >= 0:
            target, query = target[:mark], target[mark:]
        try:
            path = canonical_path(target.decode("ascii"))
        except (PathRejected, UnicodeDecodeError) as exc:
            reason = exc.reason if isinstance(exc, PathRejected) else "non-ASCII request target"
            return self._reject(400, "path_rejected", "Request path rejected", reason)
        canonical = path.encode()
        if self.classic_prefixes and path.startswith(self.classic_prefixes):
            if canonical != target:
                return self._reject(
                    400, "path_rejected", "Request path rejected", "classic path is not canonical"
                )
            m.classic.inc()
            return _CLASSIC_VERDICT
        app_routes: AppRoutes = rules.routes.apps[self.app]
        found = app_routes.match(head.method, path)
        forward_target = canonical + query if query else canonical

        presented: License | LicenseError | None = None
        tenant_id: str | None = None
        if token is not None:
            presented = self.shared.licenses.resolve(token)
            if isinstance(presented, License):
                tenant_id = presented.claims.sub
                # An upstream that scopes data by the tenant header must not see it next to
                # another tenant's (borrowed) entitlements.
                if head.tenant is not None and head.tenant != tenant_id.encode():
                    return self._reject(
                        403,
                        "tenant_mismatch",
                        "License key and tenant disagree",
                        "the license key belongs to another tenant than the tenant header names",
                        outcome="blocked",
                    )
        elif head.tenant is not None:
            try:
                tenant_id = head.tenant.decode("utf-8")
            except UnicodeDecodeError:
                return self._reject(400, "bad_header", "Bad request header", "tenant id not UTF-8")
        record: TenantRecord | None = None
        if tenant_id is not None:
            cached = self.shared.tenants.cached(tenant_id)
            if cached is _NO_TENANT:
                public = found.kind is Match.FULL and found.route is not None and found.route.public
                if not fetched and not public:
                    return _NEED_TENANT_VERDICT
                cached = None
            record = cached  # type: ignore[assignment]
        role = head.role.decode("latin-1") if head.role is not None else None
        decision = decide(
            rules.policy, found, app_routes.unmatched, presented, record, role, time.time()
        )
        if decision.allowed:
            if decision.code == "public":
                return Verdict(FORWARD, target=forward_target, outcome="public")
            return self._allow(decision, forward_target)
        route_path = found.route.path if found.route is not None else None
        user = head.user.decode("latin-1") if head.user is not None else None
        return self._deny(decision, rules, role, user, tenant_id, route_path)

    async def prefetch(self, head: RequestHead) -> None:
        """Load what ``check`` lacked: the tenant record (of the key's tenant, or of the
        tenant id header) and, in ``classic_keys = "store"`` mode, the classic key."""
        token = head.license_key
        tenant_id: str | None = None
        if token is not None:
            if self.classic_from_store and self.classic.is_classic(token.decode("latin-1")):
                await self.shared.classic_keys.fetch(token)
                return
            resolved = self.shared.licenses.resolve(token)
            if isinstance(resolved, License):
                tenant_id = resolved.claims.sub
        elif head.tenant is not None:
            tenant_id = head.tenant.decode("utf-8", "replace")
        if tenant_id is not None:
            await self.shared.tenants.fetch(tenant_id)

    def _allow(self, decision: Decision, target: bytes) -> Verdict:
        ent = decision.entitlement
        lic = decision.license
        assert ent is not None and lic is not None
        headers = b"X-Entitlement-Tenant: %s\r\n%s" % (lic.claims.sub.encode(), ent.upstream_lines)
        warning = b""
        if decision.warning is not None:
            warning = b"X-License-Warning: %s\r\n" % decision.warning.encode()
        return Verdict(FORWARD, target=target, upstream_headers=headers, response_headers=warning)

    def _deny(
        self,
        decision: Decision,
        rules: Rules,
        role: str | None,
        user: str | None,
        tenant: str | None,
        route: str | None,
    ) -> Verdict:
        m = self.metrics
        status = decision.status
        extra = b""
        if status == 401:
            m.outcome["unlicensed"].inc()
        elif status == 503:  # license_check_busy: not decided, try again
            m.outcome["rejected"].inc()
            extra = b"Retry-After: 1\r\n"
        else:
            m.outcome["blocked"].inc()
        if decision.code == "feature_not_entitled":
            assert decision.feature is not None and decision.tier is not None
            m.feature_block(self.app, decision.feature, decision.tier).inc()
        rid = request_id()
        body = self._problem_body(decision, rules) + rid.encode() + b'"}'
        lic = decision.license
        if decision.code == "feature_not_entitled":
            self.shared.events.emit(
                "feature_block",
                tenant=tenant,
                tier=decision.tier,
                app=self.app,
                feature=decision.feature,
                route=route,
                request_id=rid,
                revision=rules.revision,
                role=role,
                user=user,
            )
        elif status == 401 and self.shared.events.admit("license_invalid"):
            # (admit first: under a key flood the event is sampled out before it is built)
            self.shared.events.emit_admitted(
                "license_invalid",
                tenant=tenant,
                tier=lic.claims.tier if lic else None,
                app=self.app,
                reason=decision.code,
                route=route,
                key_fingerprint=lic.fingerprint if lic else None,
                request_id=rid,
                revision=rules.revision,
            )
        if decision.warning is not None:
            extra += b"X-License-Warning: %s\r\n" % decision.warning.encode()
        return Verdict(RESPOND, status=status, body=body, response_headers=extra)

    def _problem_body(self, decision: Decision, rules: Rules) -> bytes:
        """The problem+json body up to the request id, encoded once per distinct denial."""
        upgrade = rules.policy.upgrade_url
        key = (
            decision.code,
            decision.detail,
            decision.feature,
            decision.tier,
            decision.required_tier,
            decision.addon,
            decision.upsell,
            upgrade,
        )
        cached = self._bodies.get(key)
        if cached is not None:
            return cached
        fields: dict[str, Any] = {
            "type": PROBLEM_TYPE + decision.code,
            "title": decision.title,
            "status": decision.status,
            "code": decision.code,
            "detail": decision.detail,
        }
        if decision.feature is not None:
            fields.update(feature=decision.feature, app=self.app, tier=decision.tier)
            if decision.code == "feature_not_entitled" and decision.upsell:
                fields.update(
                    required_tier=decision.required_tier, addon=decision.addon, upgrade=upgrade
                )
        encoded = _json.encode(fields)
        prefix = encoded[:-1] + b',"request_id":"'
        bounded_put(self._bodies, key, prefix, 4096)
        return prefix

    def _reject(
        self, status: int, code: str, title: str, detail: str, outcome: str = "rejected"
    ) -> Verdict:
        self.metrics.outcome[outcome].inc()
        body, _ = problem(status, code, title, detail)
        return Verdict(RESPOND, status=status, body=body)


class Shared:
    """State all app listeners of one process share: rules, caches, metrics, events."""

    def __init__(
        self, config: Config, metrics: Metrics, events: EventLog, store: TenantStore
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.events = events
        self.rules = Rules(config.matrix, config.routes, config.policy)
        self.licenses = LicenseCache(
            config.keyring,
            metrics,
            verifications_per_second=config.settings.license.max_verifications_per_second,
        )
        self.tenants = TenantCache(store, metrics)
        self.classic_keys = ClassicKeyCache(store, metrics)
        metrics.config_loaded(config.routes.sha, config.matrix)

    def swap_rules(self, matrix: TierMatrix, routes: RouteTable) -> None:
        policy = msgspec.structs.replace(self.rules.policy, matrix=matrix)
        self.rules = Rules(matrix, routes, policy)
        self.metrics.config_loaded(routes.sha, matrix)
