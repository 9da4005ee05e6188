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
from typing import Final

import msgspec

from gateway.answers import Answers, RefusalTarget
from gateway.attribution import Attribution
from gateway.caches import (
    NO_TENANT,
    UNAVAILABLE,
    ClassicKeyCache,
    LicenseCache,
    TenantCache,
    bounded_put,
)
from gateway.candidates import CandidateLog
from gateway.classify import ASK_STORE, REJECTED, ROUTED, ClassicRules, classify
from gateway.clicks import ClickLimiter
from gateway.config import Config
from gateway.decision import Policy, TenantRecord, decide
from gateway.endpoints import WAIT_SEATS, TenantEndpoints
from gateway.errors import IdentityError, LicenseError
from gateway.events import EventLog
from gateway.identity import NEED_KEYS, Identifier, Identity, NeedKeys
from gateway.license import License
from gateway.matrix import AppName, TierMatrix
from gateway.metrics import AppMetrics, Metrics
from gateway.problems import (
    PROBLEM_JSON,
    PROBLEM_TYPE,
    problem,
    request_id,
)
from gateway.rollout import PLAIN, Rollout, host_denial
from gateway.routes import NO_MATCH, Match, RouteTable
from gateway.seats import KNOWN, SEAT_KINDS, SeatBook
from gateway.store import TenantStore
from gateway.usage import UsageMeter, client_id
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
_WAIT_KEYS: Final = "identity_keys"
_WAIT_SEAT: Final = "seat"
_NOTHING: Final[frozenset[bytes]] = frozenset()
_FULL: Final = Match.FULL  # a module global: an Enum class attribute costs a Python-level look-up
_MAX_WAITS: Final = 3  # prefetch rounds: a tenant record, then what the record leads to
REFUSAL_TARGETS = 4096  # request targets remembered as "a refused key gets 401 here"


class Rules:
    """The hot-reloadable part of the config, swapped as one reference."""

    __slots__ = ("matrix", "routes", "policy", "revision", "refusals", "rollout")

    def __init__(
        self, matrix: TierMatrix, routes: RouteTable, policy: Policy, rollout: Rollout = PLAIN
    ) -> None:
        self.matrix = matrix
        self.routes = routes
        self.policy = policy
        self.rollout = rollout  # enforcement modes, cohort, candidate, host features
        self.revision = f"{routes.sha}/{matrix.sha}"
        # (app, method, target) -> the route look-up (with its route's pattern and name, for
        # the access log), for targets where any refused license key is answered 401 with
        # the key's reason (see Answers.fast_refusal). Per Rules: a reload starts it empty.
        self.refusals: dict[tuple[str, str, bytes], RefusalTarget] = {}


class Enforcer:
    """Enforcement for one app listener; shares caches and rules with the other apps."""

    def __init__(self, app: AppName, config: Config, shared: Shared) -> None:
        self.app = app
        self.shared = shared
        self.classic = ClassicRules.for_app(config, app)
        self._is_classic = self.classic.keys.matches
        self._classic_from_store = self.classic.from_store
        self.metrics: AppMetrics = shared.metrics.for_app(app)
        self.answers = Answers(app, shared)
        self.candidates = CandidateLog(app, shared)
        self.endpoints = TenantEndpoints(app, config, shared, self.answers)
        self._prefix = self.endpoints.prefix  # one attribute on the hot path
        # The seat kind this listener counts ([seats] mode = "active_users"), else None.
        seat_mode = config.settings.seats.mode
        self.seat_kind = SEAT_KINDS.get(app) if seat_mode == "active_users" else None
        # jwt mode, public route: no identity needed, but clients' identity headers never
        # reach the upstream
        self._no_identity = Identity(None, None, None, "none", shared.identifier.identity_headers)
        # No [identity] section: the flood path needs no identification ([identity] is read
        # at start-up only).
        self._unidentified = shared.identifier.mode == "unconfigured"

    # ------------------------------------------------------------------ the request path
    def check(self, head: RequestHead, fetched: bool = False) -> Verdict:
        """The verdict for one request. ``NEED_TENANT`` asks the caller to ``prefetch``
        and call again with ``fetched=True``, which returns what ``prefetch`` decided."""
        if fetched and head.verdict is not None:
            return head.verdict
        rules = self.shared.rules
        if head.bad_header is not None:
            return self.answers.refuse(
                400, "bad_header", "Bad request header", head.bad_header, head
            )
        token = head.license_key
        classify_key = None  # the key, for classify to ask about: one that looks classic
        if token is not None:
            if self._is_classic(token):
                if not self._classic_from_store:
                    # classify's first step, taken here: classic traffic pays for no more
                    self.metrics.classic.n += 1  # Tally.inc, inlined
                    return _CLASSIC_VERDICT
                classify_key = token  # classify says whether to ask the store
            elif rules.refusals:
                # A flood of bad keys at one target: answered before the path is looked at.
                target = rules.refusals.get((self.app, head.method, head.target))
                if target is not None:
                    # Most flood keys are refused here without a digest; the key verified
                    # before (its signing input's tag matches) takes the usual path.
                    licenses = self.shared.licenses
                    quick = licenses.quick_refusal(token)
                    if quick is not True:
                        unidentified = self._unidentified
                        if quick is not None:
                            if unidentified or self._identity_passes(head):
                                return self.answers.fast_refusal(head, quick, target, rules, True)
                            head.presented = licenses.count_refusal(quick)
                        else:
                            refused = head.presented = licenses.resolve(token)
                            if refused.__class__ is LicenseError and (
                                unidentified or self._identity_passes(head)
                            ):
                                return self.answers.fast_refusal(head, refused, target, rules)
        app_routes = rules.routes.apps[self.app]
        step = classify(self.classic, app_routes, head.method, head.target, classify_key)
        if step.kind != ROUTED:
            if step is ASK_STORE:
                assert token is not None
                known = self.shared.classic_keys.get(token)
                if known is None:
                    if not fetched:
                        head.waiting = (_WAIT_CLASSIC_KEY, None)
                        return _NEED_TENANT_VERDICT
                    # The store did not answer: an outage never refuses (fail-static), and
                    # the classic application still validates its own keys.
                    known = True
                step = classify(self.classic, app_routes, head.method, head.target, token, known)
            if step.kind == REJECTED:
                return self.answers.refuse(
                    400, "path_rejected", "Request path rejected", step.reason, head
                )
            if step.kind != ROUTED:
                self.metrics.classic.inc()
                return _CLASSIC_VERDICT
        found = step.found
        assert found is not None
        route = found.route
        endpoint: str | None = None
        if step.path.startswith(self._prefix) and self.endpoints.under_prefix(step.path):
            # The tenant endpoints: answered here in every mode, never forwarded.
            routed = self.endpoints.route(head, step.path)
            if routed.__class__ is Verdict:
                return routed
            endpoint, found, route = routed, NO_MATCH, None  # type: ignore[assignment]
        rollout = rules.rollout
        plan = None if rollout.plain else rollout.apps.get(self.app)  # None: "on", no hosts
        if plan is not None and plan.mode == "off" and endpoint is None:
            return self.answers.unenforced(step.target, route)
        public = found.kind is _FULL and route is not None and route.public
        now = time.time()

        # Who is asking: the identity headers as sent, or as [identity] allows.
        identifier = self.shared.identifier
        strip = _NOTHING
        identity_lines = b""
        if identifier.mode == "unconfigured":
            claimed: bytes | str | None = head.tenant
            role = head.role.decode("latin-1") if head.role is not None else None
            user = head.user.decode("latin-1") if head.user is not None else None
            ident = None
        else:
            ident = self._identify(head, identifier, public, token is not None, now, fetched)
            if ident.__class__ is not Identity:
                if ident is NEED_KEYS:
                    head.waiting = (_WAIT_KEYS, None)
                    return _NEED_TENANT_VERDICT
                return self.answers.identity_refusal(head, ident, found, rules, now)  # type: ignore[arg-type]
            claimed, role, user = ident.tenant, ident.role, ident.user
            strip, identity_lines = ident.strip, ident.upstream_headers
        if public:
            return self.answers.public(step.target, route, strip)

        presented: License | LicenseError | None = None
        tenant_id: str | None = None
        if token is not None:
            # The key's verdict, looked up once per request (and counted once), across the
            # waits of NEED_TENANT.
            presented = head.presented
            if presented is UNRESOLVED:
                presented = head.presented = self.shared.licenses.resolve(token)
            if presented.__class__ is License:
                tenant_id = presented.claims.sub
                # An upstream that scopes data by the tenant header must not see it next to
                # another tenant's (borrowed) entitlements.
                if ident is None:
                    if claimed is not None and claimed != tenant_id.encode():
                        return self.answers.mismatch(head, found, rules, presented, claimed, now)
                elif identifier.check_tenant(ident, tenant_id) is not None:  # type: ignore[arg-type]
                    return self.answers.mismatch(head, found, rules, presented, claimed, now)  # type: ignore[arg-type]
        elif claimed is not None:
            if claimed.__class__ is bytes:
                try:
                    tenant_id = claimed.decode("utf-8")
                except UnicodeDecodeError:
                    return self.answers.refuse(
                        400, "bad_header", "Bad request header", "tenant id not UTF-8", head
                    )
            else:
                tenant_id = claimed  # type: ignore[assignment]
        record: TenantRecord | None = None
        if tenant_id is not None:
            cached = self.shared.tenants.cached(tenant_id)
            if cached is NO_TENANT:
                if not fetched:
                    head.waiting = (_WAIT_TENANT, tenant_id)
                    return _NEED_TENANT_VERDICT
                cached = None  # fetched, and gone again at once: as good as unknown
            elif cached is UNAVAILABLE:
                if presented is None:
                    return self.answers.refuse(
                        503,
                        "store_unavailable",
                        "Tenant store unavailable",
                        "the tenant store cannot answer now; retry shortly",
                        head,
                        extra=b"Retry-After: 1\r\n",
                        found=found,
                        tenant=tenant_id,
                    )
                cached = None  # a verified key decides on its own meanwhile (fail-static)
            record = cached  # type: ignore[assignment]
        if endpoint is not None:
            answered = self.endpoints.respond(
                endpoint, head, presented, record, role, user, rules, now
            )
            if answered is None:  # the seats held are counted first (head.waiting)
                return _NEED_TENANT_VERDICT
            if answered.__class__ is Verdict:
                answered.strip = strip
                return answered
            return self.answers.deny(head, answered, rules, role, user, tenant_id, found, now)  # type: ignore[arg-type]
        decision = decide(rules.policy, found, app_routes.unmatched, presented, record, role, now)
        lic = decision.license
        if lic is not None and lic.claims.addons:
            self.answers.check_addons(head, lic, found, rules, now)
        if plan is not None and decision.code == "allowed" and plan.host_feature is not None:
            host = plan.other_host(head.host)
            ent = decision.entitlement
            if host is not None and ent is not None and plan.host_feature not in ent.features:
                decision = host_denial(rules.matrix, decision, plan.host_feature, host)
        if rollout.candidate is not None:
            self.candidates.compare(
                rollout.candidate, head, step.path, found, decision, presented, record, role,
                tenant_id, rules, now,
            )  # fmt: skip
        admission = None
        if self.seat_kind is not None and user is not None and decision.code == "allowed":
            # [seats] mode = "active_users": the user holds a seat, or is admitted to one.
            assert lic is not None
            admission = head.admission
            if admission is None:
                seats = self.shared.seats
                if seats.check(lic.claims.sub, self.seat_kind, user, now) != KNOWN:
                    head.waiting = (_WAIT_SEAT, (lic.claims.sub, user, decision))
                    return _NEED_TENANT_VERDICT
            elif not admission.allowed:
                decision = self.answers.seat_decision(admission, decision, role, rules)
        if decision.allowed:
            verdict = self.answers.allow(decision, step.target, found, identity_lines, strip)
            if route is None:  # no route matched (unmatched = "allow")
                self.answers.unmatched_allowed(head, verdict, step.path, tenant_id, rules)
            if admission is not None and user is not None:
                self.answers.admitted(head, verdict, admission, user, rules)
            assert lic is not None
            client = "" if head.client_id is None else client_id(head.client_id)
            self.shared.usage.count(lic.claims.sub, decision.feature, client, now)
            return verdict
        shadowed = plan is not None and plan.mode == "shadow"
        if shadowed and (tenant_id is None or tenant_id not in rollout.cohort):
            return self.answers.shadow(
                head, decision, rules, role, user, tenant_id, found, now, step.target,
                identity_lines, strip,
            )  # fmt: skip
        if (
            plan is None
            and presented.__class__ is LicenseError
            and decision.code == presented.reason
            and len(rules.refusals) < REFUSAL_TARGETS
        ):
            # Any other refused key would get the same answer here: remember the target.
            path, name = (None, None) if route is None else (route.path, route.name)
            rules.refusals[(self.app, head.method, head.target)] = (found, path, name)
        return self.answers.deny(head, decision, rules, role, user, tenant_id, found, now)

    def _identify(
        self,
        head: RequestHead,
        identifier: Identifier,
        public: bool,
        has_license: bool,
        now: float,
        refreshed: bool,
    ) -> Identity | IdentityError | NeedKeys:
        """The request's identity; a public route only learns which headers not to forward
        (it needs no identity)."""
        forwarded = head.forwarded_for or None
        if not public:
            return identifier.identify(
                head.peer, forwarded, head.tenant, head.user, head.role, head.token,
                has_license=has_license, now=now, refreshed=refreshed,
            )  # fmt: skip
        if identifier.mode == "jwt":
            return self._no_identity
        return identifier.identify(
            head.peer, forwarded, None, None, None, None, has_license=True, now=now
        )

    def _identity_passes(self, head: RequestHead) -> bool:
        """For the flood path, with ``[identity]`` configured: would identification let
        this request through to the license check (as the long path would find)?"""
        identifier = self.shared.identifier
        found = identifier.identify(
            head.peer, head.forwarded_for or None, head.tenant, head.user, head.role,
            head.token, has_license=True, now=time.time(),
        )  # fmt: skip
        return found.__class__ is Identity

    def answer(self, head: RequestHead, body: bytes) -> Verdict:
        """After ``COLLECT``: the answer to a tenant endpoint's request ``body`` (at most
        ``verdict.max_body`` bytes, read by the relay)."""
        return self.endpoints.answer(head, body)

    async def prefetch(self, head: RequestHead) -> None:
        """Load what ``check`` lacked (the tenant record of the request's tenant, a classic
        key's store entry, the identity provider's keys), then decide; ``check(head,
        fetched=True)`` returns that verdict."""
        for _ in range(_MAX_WAITS):
            kind, what = head.waiting or ("", None)  # (what to load, for whom)
            head.waiting = None
            if kind == _WAIT_CLASSIC_KEY:
                assert head.license_key is not None
                await self.shared.classic_keys.fetch(head.license_key)
            elif kind == _WAIT_TENANT:
                assert isinstance(what, str)
                await self.shared.tenants.fetch(what)
            elif kind == _WAIT_KEYS:
                await self.shared.identifier.refresh_keys()
            elif kind == _WAIT_SEAT:
                assert self.seat_kind is not None and what is not None
                tenant, user, decision = what
                head.admission = await self.shared.seats.admit(
                    tenant, self.seat_kind, user, matrix=self.shared.rules.matrix,
                    tier=decision.tier, seats=decision.seats, now=time.time(),
                )  # fmt: skip
            elif kind == WAIT_SEATS:  # GET {prefix} in active_users mode
                assert isinstance(what, str)
                head.state = await self.shared.seats.count_held(what, time.time())
            verdict = self.check(head, fetched=True)  # head.verdict is still None here
            if verdict is not _NEED_TENANT_VERDICT:
                head.verdict = verdict
                return
        raise RuntimeError(f"{head!r}: still waiting for {head.waiting!r}")


class Shared:
    """State all app listeners of one process share: rules, caches, metrics, events."""

    def __init__(
        self, config: Config, metrics: Metrics, events: EventLog, store: TenantStore
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.events = events
        self.rules = Rules(config.matrix, config.routes, config.policy, config.rollout)
        self.licenses = LicenseCache(
            config.keyring,
            metrics,
            verifications_per_second=config.settings.license.max_verifications_per_second,
        )
        self.tenants = TenantCache(store, metrics)
        self.classic_keys = ClassicKeyCache(store, metrics)
        # Who is asking ([identity]); the runtime starts it (jwt mode loads the JWKS).
        self.identifier = Identifier.from_config(config)
        self.addons_reported: dict[str, bool] = {}  # key fingerprints told addon_not_available
        # Seat holders and usage counts ([seats], README "Seats and usage"); the runtime
        # runs the usage flusher and follows the store's changes for both.
        self.seats = SeatBook(store, config.settings.seats, metrics)
        self.usage = UsageMeter(store, metrics)
        # The tenant endpoints' click rate per tenant, and the funnel's recent blocks and
        # clicks for upgrade_complete (README, Entitlements API and plan page).
        self.clicks = ClickLimiter()
        self.attribution = Attribution(config.settings.entitlements.attribution_days)
        metrics.config_loaded(config.routes.sha, config.matrix, config.rollout.describe())

    def swap_rules(
        self, matrix: TierMatrix, routes: RouteTable, rollout: Rollout | None = None
    ) -> None:
        """Swap in a reloaded route table and matrix (and rollout; None: keep it)."""
        policy = msgspec.structs.replace(self.rules.policy, matrix=matrix)
        rollout = rollout if rollout is not None else self.rules.rollout
        self.rules = Rules(matrix, routes, policy, rollout)
        self.metrics.config_loaded(routes.sha, matrix, rollout.describe())
