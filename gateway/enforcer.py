"""One request's enforcement, without sockets: classification (classic, canonical path,
route), license (through caches), decision, and the answer or the headers for the upstream.

The proxy protocol fills a ``RequestHead`` while parsing and calls ``Enforcer.check``;
everything here is synchronous and allocation-light. A wait (a tenant record the cache does
not hold, a classic key to ask the store about) is signalled with ``NEED_TENANT``: the
caller awaits ``Enforcer.prefetch(head)``, which loads what was missing and decides, and
``check(head, fetched=True)`` returns that verdict. Rules (routes, matrix, policy) are read
from ``Rules`` once per request, so a reload never changes a request half-way.

    verdict = enforcer.check(head)
    if verdict.kind == NEED_TENANT:
        await enforcer.prefetch(head)
        verdict = enforcer.check(head, fetched=True)
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import msgspec

from gateway.caches import (
    NO_TENANT,
    UNAVAILABLE,
    ClassicKeyCache,
    LicenseCache,
    TenantCache,
    bounded_put,
)
from gateway.classify import ASK_STORE, REJECTED, ROUTED, ClassicRules, classify
from gateway.config import Config
from gateway.decision import STATUS, Decision, Policy, TenantRecord, decide
from gateway.errors import LicenseError
from gateway.events import EventLog
from gateway.license import License
from gateway.matrix import AppName, TierMatrix
from gateway.metrics import AppMetrics, Metrics
from gateway.problems import (
    PROBLEM_JSON,
    PROBLEM_TYPE,
    problem,
    problem_prefix,
    request_id,
    with_request_id,
)
from gateway.routes import Match, RouteMatch, RouteTable
from gateway.store import TenantStore
from gateway.verdict import (
    CLASSIC,
    COLLECT,
    FORWARD,
    NEED_TENANT,
    RESPOND,
    UNRESOLVED,
    RequestHead,
    Verdict,
)

__all__ = [
    "CLASSIC",
    "COLLECT",
    "FORWARD",
    "NEED_TENANT",
    "PROBLEM_JSON",
    "PROBLEM_TYPE",
    "RESPOND",
    "ClassicKeyCache",
    "Enforcer",
    "LicenseCache",
    "RequestHead",
    "Rules",
    "Shared",
    "TenantCache",
    "Verdict",
    "bounded_put",
    "problem",
    "request_id",
]

log = logging.getLogger(__name__)

_CLASSIC_VERDICT: Final = Verdict(CLASSIC, outcome="classic")
_NEED_TENANT_VERDICT: Final = Verdict(NEED_TENANT)
_WAIT_CLASSIC_KEY: Final = "classic_key"
_WAIT_TENANT: Final = "tenant"
_MAX_WAITS: Final = 3  # prefetch rounds: a tenant record, then what the record leads to
REFUSAL_TARGETS = 4096  # request targets remembered as "a refused key gets 401 here"


class Rules:
    """The hot-reloadable part of the config, swapped as one reference."""

    __slots__ = ("matrix", "routes", "policy", "revision", "refusals")

    def __init__(self, matrix: TierMatrix, routes: RouteTable, policy: Policy) -> None:
        self.matrix = matrix
        self.routes = routes
        self.policy = policy
        self.revision = f"{routes.sha}/{matrix.sha}"
        # (app, method, target) -> the route look-up, for targets where any refused license
        # key is answered 401 with the key's reason (see Enforcer._fast_refusal). Per
        # Rules: a reload starts it empty.
        self.refusals: dict[tuple[str, str, bytes], RouteMatch] = {}


class Enforcer:
    """Enforcement for one app listener; shares caches and rules with the other apps."""

    def __init__(self, app: AppName, config: Config, shared: Shared) -> None:
        self.app = app
        self.shared = shared
        self.classic = ClassicRules.for_app(config, app)
        self._is_classic = self.classic.keys.is_classic
        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._refusals: dict[tuple[str, str], bytes] = {}  # (reason, detail) -> body prefix
        self.metrics: AppMetrics = shared.metrics.for_app(app)

    # ------------------------------------------------------------------ the request path
    def check(self, head: RequestHead, fetched: bool = False) -> Verdict:
        """The verdict for one request. ``NEED_TENANT`` asks the caller to ``prefetch``
        and call again with ``fetched=True``, which returns what ``prefetch`` decided."""
        if fetched and head.verdict is not None:
            return head.verdict
        return self._check(head, fetched)

    def _check(self, head: RequestHead, fetched: bool) -> Verdict:
        rules = self.shared.rules
        if head.bad_header is not None:
            return self._reject(400, "bad_header", "Bad request header", head.bad_header, head)
        token = head.license_key
        classify_key = token
        if token is not None and rules.refusals:
            # A flood of bad keys at one target: answered before the path is looked at.
            found = rules.refusals.get((self.app, head.method, head.target))
            if found is not None and not self._is_classic(token.decode("latin-1")):
                refused = head.presented = self.shared.licenses.resolve(token)
                if refused.__class__ is LicenseError:
                    return self._fast_refusal(head, refused, found, rules)
                classify_key = None  # known not to be classic: classify need not ask again
        app_routes = rules.routes.apps[self.app]
        step = classify(self.classic, app_routes, head.method, head.target, classify_key)
        if step.kind != ROUTED:
            if step is ASK_STORE:
                assert token is not None
                known = self.shared.classic_keys.get(token)
                if known is None:
                    if not fetched:
                        head.waiting = _WAIT_CLASSIC_KEY
                        return _NEED_TENANT_VERDICT
                    # The store did not answer: an outage never refuses (fail-static), and
                    # the classic application still validates its own keys.
                    known = True
                step = classify(self.classic, app_routes, head.method, head.target, token, known)
            if step.kind == REJECTED:
                return self._reject(
                    400, "path_rejected", "Request path rejected", step.reason, head
                )
            if step.kind != ROUTED:
                self.metrics.classic.inc()
                return _CLASSIC_VERDICT
        found = step.found
        assert found is not None
        route = found.route
        public = found.kind is Match.FULL and route is not None and route.public

        presented: License | LicenseError | None = None
        tenant_id: str | None = None
        if token is not None:
            presented = self._resolve(head, token)
            if presented.__class__ is License:
                tenant_id = presented.claims.sub
                # An upstream that scopes data by the tenant header must not see it next to
                # another tenant's (borrowed) entitlements.
                if head.tenant is not None and head.tenant != tenant_id.encode():
                    return self._reject(
                        403,
                        "tenant_mismatch",
                        "License key and tenant disagree",
                        "the license key belongs to another tenant than the tenant header names",
                        head,
                        outcome="blocked",
                    )
        elif head.tenant is not None:
            try:
                tenant_id = head.tenant.decode("utf-8")
            except UnicodeDecodeError:
                return self._reject(
                    400, "bad_header", "Bad request header", "tenant id not UTF-8", head
                )
        record: TenantRecord | None = None
        if tenant_id is not None and not public:
            cached = self.shared.tenants.cached(tenant_id)
            if cached is NO_TENANT:
                if not fetched:
                    head.waiting = _WAIT_TENANT
                    return _NEED_TENANT_VERDICT
                cached = None  # fetched, and gone again at once: as good as unknown
            elif cached is UNAVAILABLE:
                if presented is None:
                    return self._store_unavailable(head)
                cached = None  # a verified key decides on its own meanwhile (fail-static)
            record = cached  # type: ignore[assignment]
        role = head.role.decode("latin-1") if head.role is not None else None
        decision = decide(
            rules.policy, found, app_routes.unmatched, presented, record, role, time.time()
        )
        if decision.allowed:
            if decision.code == "public":
                return Verdict(
                    FORWARD,
                    target=step.target,
                    outcome="public",
                    route=route.path if route is not None else None,
                    route_name=route.name if route is not None else None,
                    code="public",
                )
            return self._allow(decision, step.target, found)
        if (
            presented.__class__ is LicenseError
            and decision.code == presented.reason
            and len(rules.refusals) < REFUSAL_TARGETS
        ):
            # Any other refused key would get the same answer here: remember the target.
            rules.refusals[(self.app, head.method, head.target)] = found
        user = head.user.decode("latin-1") if head.user is not None else None
        return self._deny(head, decision, rules, role, user, tenant_id, found)

    def _resolve(self, head: RequestHead, token: bytes) -> License | LicenseError:
        """The key's verdict, looked up once per request (and counted once)."""
        presented = head.presented
        if presented is UNRESOLVED:
            presented = head.presented = self.shared.licenses.resolve(token)
        return presented  # type: ignore[no-any-return]

    async def prefetch(self, head: RequestHead) -> None:
        """Load what ``check`` lacked (the tenant record of the key's tenant or of the
        tenant id header; a classic key's store entry), then decide; ``check(head,
        fetched=True)`` returns that verdict."""
        for _ in range(_MAX_WAITS):
            waiting, head.waiting = head.waiting, None
            if waiting == _WAIT_CLASSIC_KEY:
                assert head.license_key is not None
                await self.shared.classic_keys.fetch(head.license_key)
            elif waiting == _WAIT_TENANT:
                tenant = self._tenant_of(head)
                if tenant is not None:
                    await self.shared.tenants.fetch(tenant)
            verdict = self._check(head, fetched=True)
            if verdict is not _NEED_TENANT_VERDICT:
                head.verdict = verdict
                return
        raise RuntimeError(f"{head!r}: still waiting for {head.waiting!r}")

    def _tenant_of(self, head: RequestHead) -> str | None:
        presented = head.presented
        if isinstance(presented, License):
            return presented.claims.sub
        if head.tenant is not None:
            return head.tenant.decode("utf-8", "replace")
        return None

    # ------------------------------------------------------------------ answers
    def _allow(self, decision: Decision, target: bytes, found: RouteMatch) -> Verdict:
        ent = decision.entitlement
        lic = decision.license
        assert ent is not None and lic is not None
        tenant = lic.claims.sub
        headers = b"X-Entitlement-Tenant: %s\r\n%s" % (tenant.encode(), ent.upstream_lines)
        warning = b""
        if decision.warning is not None:
            warning = b"X-License-Warning: %s\r\n" % decision.warning.encode()
        # Positional, then the access log's fields: half the cost of keyword arguments.
        verdict = Verdict(FORWARD, 0, b"", target, headers, warning)
        route = found.route
        if route is not None:
            verdict.route = route.path
            verdict.route_name = route.name
        verdict.feature = decision.feature
        verdict.tenant = tenant
        verdict.tier = decision.tier
        verdict.code = "allowed"
        return verdict

    def _deny(
        self,
        head: RequestHead,
        decision: Decision,
        rules: Rules,
        role: str | None,
        user: str | None,
        tenant: str | None,
        found: RouteMatch,
    ) -> Verdict:
        m = self.metrics
        status = decision.status
        extra = b""
        outcome = "blocked"
        if status == 401:
            outcome = "unlicensed"
        elif status == 503:  # license_check_busy: not decided, try again
            outcome = "rejected"
            extra = b"Retry-After: 1\r\n"
        m.outcome[outcome].inc()
        if decision.code == "feature_not_entitled":
            assert decision.feature is not None and decision.tier is not None
            m.feature_block(self.app, decision.feature, decision.tier).inc()
        rid = head.request_id or request_id()
        body = with_request_id(self._problem_prefix(decision, rules), rid)
        lic = decision.license
        route = found.route
        pattern = route.path if route is not None else None
        if decision.code == "feature_not_entitled":
            self.shared.events.emit(
                "feature_block",
                tenant=tenant,
                tier=decision.tier,
                app=self.app,
                feature=decision.feature,
                route=pattern,
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
                route=pattern,
                key_fingerprint=lic.fingerprint if lic else None,
                request_id=rid,
                revision=rules.revision,
            )
        if decision.warning is not None:
            extra += b"X-License-Warning: %s\r\n" % decision.warning.encode()
        return Verdict(
            RESPOND,
            status=status,
            body=body,
            response_headers=extra,
            outcome=outcome,
            route=pattern,
            route_name=route.name if route is not None else None,
            feature=decision.feature,
            tenant=tenant,
            tier=decision.tier,
            code=decision.code,
        )

    def _fast_refusal(
        self, head: RequestHead, error: LicenseError, found: RouteMatch, rules: Rules
    ) -> Verdict:
        """401 for a refused key at a target where every refused key gets that answer: the
        same body, metric and (sampled) event as the full path, without the path work."""
        key = (error.reason, error.detail)
        prefix = self._refusals.get(key)
        if prefix is None:
            status = STATUS[error.reason]
            decision = Decision(
                allowed=False, status=status, code=error.reason, detail=error.detail
            )
            prefix = self._problem_prefix(decision, rules)
            bounded_put(self._refusals, key, prefix, 1024)
        status = 503 if error.reason == "license_check_busy" else 401
        outcome = "rejected" if status == 503 else "unlicensed"
        self.metrics.outcome[outcome].inc()
        rid = head.request_id or request_id()
        route = found.route
        if self.shared.events.admit("license_invalid"):
            self.shared.events.emit_admitted(
                "license_invalid",
                tenant=None,
                tier=None,
                app=self.app,
                reason=error.reason,
                route=route.path if route is not None else None,
                key_fingerprint=None,
                request_id=rid,
                revision=rules.revision,
            )
        extra = b"Retry-After: 1\r\n" if status == 503 else b""
        verdict = Verdict(RESPOND, status, with_request_id(prefix, rid), b"", b"", extra, outcome)
        if route is not None:
            verdict.route = route.path
            verdict.route_name = route.name
        verdict.code = error.reason
        return verdict

    def _problem_prefix(self, decision: Decision, rules: Rules) -> bytes:
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
        fields: dict[str, Any] = {}
        if decision.feature is not None:
            fields.update(feature=decision.feature, app=self.app, tier=decision.tier)
            if decision.code == "feature_not_entitled" and decision.upsell:
                fields.update(
                    required_tier=decision.required_tier, addon=decision.addon, upgrade=upgrade
                )
        prefix = problem_prefix(
            decision.status, decision.code, decision.title, decision.detail, **fields
        )
        bounded_put(self._bodies, key, prefix, 4096)
        return prefix

    def _store_unavailable(self, head: RequestHead) -> Verdict:
        """A tenant the store could not load, while it cannot answer: not refused (the
        tenant may well be stored), but not decided either."""
        return self._reject(
            503,
            "store_unavailable",
            "Tenant store unavailable",
            "the tenant store cannot answer now; retry shortly",
            head,
            extra=b"Retry-After: 1\r\n",
        )

    def _reject(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        head: RequestHead,
        outcome: str = "rejected",
        extra: bytes = b"",
    ) -> Verdict:
        self.metrics.outcome[outcome].inc()
        body = with_request_id(
            problem_prefix(status, code, title, detail), head.request_id or request_id()
        )
        return Verdict(
            RESPOND, status=status, body=body, response_headers=extra, outcome=outcome, code=code
        )


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
