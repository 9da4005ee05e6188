"""The answers of one app listener: the verdicts ``Enforcer.check`` returns once it knows
the outcome — forward (licensed, public) or answer here (a denial by ``decide``, or a
refusal before it: bad header, path, identity, tenant mismatch, store outage) — with the
metric, the problem body (encoded once per distinct refusal) and the refusal event
(``gateway.refusals``) that go with each. (Longer than ~500 lines: one method per kind of
answer, each building its verdict, metric and event together, so no answer is half here.)

    answers = Answers("operations", shared)
    verdict = answers.deny(head, decision, rules, role, user, tenant, found, now)
"""

from __future__ import annotations

import time
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

import msgspec

from gateway.caches import bounded_put
from gateway.decision import STATUS, Decision, allowed_roles, effective_plan
from gateway.errors import IdentityError, LicenseError
from gateway.identity import TENANT_MISMATCH
from gateway.license import License
from gateway.matrix import AppName
from gateway.problems import (
    PROBLEM_JSON,
    UpgradeParts,
    problem_prefix,
    request_id,
    upgrade_parts,
    with_request_id,
    with_upgrade,
)
from gateway.refusals import RefusalLog, decision_prefix
from gateway.rollout import path_shape
from gateway.routes import Route, RouteMatch
from gateway.seats import Admission, emit_seat_events, seat_problem
from gateway.verdict import FORWARD, RESPOND, RequestHead, Verdict

if TYPE_CHECKING:
    from gateway.enforcer import Rules, Shared
    from gateway.metrics import Tally

_encode: Final = msgspec.json.encode
_KEEP_ALL: Final[frozenset[bytes]] = frozenset()  # request headers not to forward: none
# Body prefix, status, extra headers, outcome, and the tally of what the answer counts (the
# outcome; for a quick refusal also the key result and the cache miss, in one JointTally)
_FastAnswer = tuple[bytes, int, bytes, str, "Tally"]
# A target where every refused key gets the same answer (Rules.refusals): its route look-up,
# and the route's pattern and name for the access log (None, None: no route matched).
RefusalTarget = tuple[RouteMatch, str | None, str | None]

# The event a decision's refusal code is reported as (the others: the code itself).
_EVENT_OF: Final = {
    "feature_not_entitled": "feature_block",
    **{code: "license_invalid" for code, status in STATUS.items() if status == 401},
    "license_check_busy": "license_invalid",
}


class Answers:
    """Verdicts, metrics, problem bodies and refusal events of one app listener."""

    def __init__(self, app: AppName, shared: Shared) -> None:
        self.app = app
        self.shared = shared
        self.metrics = shared.metrics.for_app(app)
        self.refusals = RefusalLog(shared.events, app)
        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._upgrades: dict[tuple[Any, ...], UpgradeParts] = {}  # feature blocks' bodies
        # What a fast_refusal answers with, by (reason, detail); a quick refusal's (its
        # error is one shared object), by the error
        self._fast: dict[tuple[str, str], _FastAnswer] = {}
        self._fast_quick: dict[LicenseError, _FastAnswer] = {}
        self._admit_invalid = shared.events.admit
        self._invalid_limit, self._invalid_dropped = shared.events.sampler("license_invalid")

    def public(self, target: bytes, route: Route | None, strip: frozenset[bytes]) -> Verdict:
        return Verdict(
            FORWARD,
            target=target,
            outcome="public",
            strip=strip,
            route=route.path if route is not None else None,
            route_name=route.name if route is not None else None,
            code="public",
        )

    def allow(
        self,
        decision: Decision,
        target: bytes,
        found: RouteMatch,
        identity_lines: bytes,
        strip: frozenset[bytes],
    ) -> Verdict:
        ent = decision.entitlement
        lic = decision.license
        assert ent is not None and lic is not None
        tenant = lic.claims.sub
        headers = b"X-Entitlement-Tenant: %s\r\n%s%s" % (
            tenant.encode(),
            ent.upstream_lines,
            identity_lines,
        )
        warning = b""
        if decision.warning is not None:
            warning = b"X-License-Warning: %s\r\n" % decision.warning.encode()
        route = found.route
        path, name = (None, None) if route is None else (route.path, route.name)
        # Every field at once and in order: positional is the cheapest way to build a Struct.
        return Verdict(
            FORWARD, 0, b"", target, headers, warning, "allowed", PROBLEM_JSON, strip, False, 0,
            path, name, decision.feature, tenant, decision.tier, "allowed",
        )  # fmt: skip

    def seat_decision(
        self, admission: Admission, allowed: Decision, role: str | None, rules: Rules
    ) -> Decision:
        """The 429 ``seat_limit_exceeded`` of a new user beyond the allowance, as a denial
        (so shadow mode treats it like any other); ``deny`` adds the seat fields."""
        detail, _ = seat_problem(admission, rules.matrix, role, rules.policy.upgrade_url)
        return msgspec.structs.replace(
            allowed,
            allowed=False,
            status=STATUS["seat_limit_exceeded"],
            code="seat_limit_exceeded",
            detail=detail,
            entitlement=None,
            seat=admission,
        )

    def admitted(
        self, head: RequestHead, verdict: Verdict, admission: Admission, user: str, rules: Rules
    ) -> None:
        """A new user admitted to a seat: ``X-Seat-Warning`` beyond the included seats, and
        the ``seat_overage`` / ``seat_warning`` events (once per user, per window)."""
        if admission.warning is not None:
            verdict.response_headers += b"X-Seat-Warning: %s\r\n" % admission.warning.encode()
        if admission.events:
            assert verdict.tenant is not None
            emit_seat_events(
                self.shared.events, admission, tenant=verdict.tenant, app=self.app, user=user,
                request_id=head.request_id or request_id(), revision=rules.revision,
            )  # fmt: skip

    def deny(
        self,
        head: RequestHead,
        decision: Decision,
        rules: Rules,
        role: str | None,
        user: str | None,
        tenant: str | None,
        found: RouteMatch,
        now: float,
    ) -> Verdict:
        m = self.metrics
        status = decision.status
        code = decision.code
        extra = b""
        outcome = "blocked"
        if status == 401:
            outcome = "unlicensed"
        elif status == 503:  # license_check_busy: not decided, try again
            outcome = "rejected"
            extra = b"Retry-After: 1\r\n"
        m.outcome[outcome].n += 1  # Tally.inc, inlined (as below): per refusal
        if code == "feature_not_entitled":
            assert decision.feature is not None and decision.tier is not None
            m.feature_block(self.app, decision.feature, decision.tier).n += 1
            if tenant is not None:  # for upgrade_complete's attributed_blocks
                self.shared.attribution.block(tenant, decision.feature, now)
        rid = head.request_id or request_id()
        lic = decision.license
        facts = self.refusals.facts(rules.policy, lic, now) if lic is not None else None
        route = found.route
        if isinstance(decision.seat, Admission):  # active_users: the seat numbers too
            _, fields = seat_problem(decision.seat, rules.matrix, role, rules.policy.upgrade_url)
            if facts is not None:
                fields.update(license_state=facts[0], expires_at=facts[1])
            prefix = problem_prefix(
                decision.status, decision.code, decision.title, decision.detail, **fields
            )
            body = with_request_id(prefix, rid)
        elif code == "feature_not_entitled" and decision.upsell:
            assert decision.feature is not None
            body = with_upgrade(self._upgrade_parts(decision, rules, facts, route), rid)
        else:
            body = with_request_id(self._prefix(decision, rules, facts, route), rid)
        self._report(head, rid, decision, rules, role, user, tenant, route, now)
        if decision.warning is not None:
            extra += b"X-License-Warning: %s\r\n" % decision.warning.encode()
        return respond(
            status, body, extra, outcome, route, code, decision.feature, tenant, decision.tier
        )

    def _report(
        self,
        head: RequestHead,
        rid: str,
        decision: Decision,
        rules: Rules,
        role: str | None,
        user: str | None,
        tenant: str | None,
        route: Route | None,
        now: float,
        **more: Any,
    ) -> None:
        """The refusal event of a denial by ``decide``."""
        code = decision.code
        kind = _EVENT_OF.get(code, code)
        feature = decision.feature if kind == "feature_block" else None
        if not self.refusals.admit(kind, tenant, feature, decision.tier, now):
            return
        fields: dict[str, Any] = {}
        if kind == "feature_block":
            fields = {"feature": decision.feature, "role": role, "user": user}
        elif kind == "license_invalid":
            fields = {"reason": code, "detail": decision.detail}
        elif code == "role_forbidden":
            allowed = route.roles if route is not None else None
            fields = {
                "feature": decision.feature,
                "role": role,
                "user": user,
                "allowed_roles": allowed_roles(allowed) if allowed is not None else None,
            }
        elif code == "seat_limit_exceeded":
            fields = {"feature": decision.feature, "user": user, "detail": decision.detail}
            if isinstance(decision.seat, Admission):
                seat = decision.seat
                fields.update(
                    seat=seat.limits.kind,
                    used=seat.used,
                    included=seat.limits.included,
                    allowance=seat.limits.allowance,
                )
        elif code == "route_unmatched":
            fields = {"method": head.method}
        self.refusals.write(
            kind, head, rid, rules.revision, code=code, route=route, tenant=tenant,
            license=decision.license, policy=rules.policy, now=now, tier=decision.tier,
            **fields, **more,
        )  # fmt: skip

    def shadow(
        self,
        head: RequestHead,
        decision: Decision,
        rules: Rules,
        role: str | None,
        user: str | None,
        tenant: str | None,
        found: RouteMatch,
        now: float,
        target: bytes,
        identity_lines: bytes,
        strip: frozenset[bytes],
    ) -> Verdict:
        """``enforce = "shadow"``: what ``deny`` would answer is reported (the event with
        ``"shadow": true``, ``gateway_shadow_block_total`` for a feature) and the request is
        forwarded as an allowed one would be (the upstream gets the plan's
        ``X-Entitlement-*``; the client no ``X-License-Warning``)."""
        if decision.code == "feature_not_entitled":
            assert decision.feature is not None and decision.tier is not None
            self.metrics.feature_block(self.app, decision.feature, decision.tier, True).inc()
        rid = head.request_id or request_id()
        route = found.route
        self._report(head, rid, decision, rules, role, user, tenant, route, now, shadow=True)
        headers = identity_lines
        lic = decision.license
        plan = effective_plan(rules.policy, lic.claims, now) if lic is not None else None
        if lic is not None and plan is not None:
            entitlement = rules.matrix.entitlement(plan.tier, plan.addons)
            headers = b"X-Entitlement-Tenant: %s\r\n%s%s" % (
                lic.claims.sub.encode(),
                entitlement.upstream_lines,
                identity_lines,
            )
        verdict = Verdict(FORWARD, 0, b"", target, headers, b"", "shadow_blocked")
        verdict.strip = strip
        if route is not None:
            verdict.route = route.path
            verdict.route_name = route.name
        verdict.feature = decision.feature
        verdict.tenant = tenant
        verdict.tier = plan.tier if plan is not None else decision.tier
        verdict.code = decision.code
        return verdict

    def unenforced(self, target: bytes, route: Route | None) -> Verdict:
        """``enforce = "off"``: forwarded undecided (inbound ``X-Entitlement-*`` is still
        stripped by the relay, as always)."""
        verdict = Verdict(FORWARD, 0, b"", target, b"", b"", "unenforced")
        if route is not None:
            verdict.route = route.path
            verdict.route_name = route.name
        return verdict

    def unmatched_allowed(
        self, head: RequestHead, verdict: Verdict, path: str, tenant: str | None, rules: Rules
    ) -> None:
        """A request no route matched, let through by ``unmatched = "allow"``: its own
        outcome, and a sampled event with the path's shape (ids replaced) so missing
        mappings show on the dashboard."""
        verdict.outcome = "unmatched_allowed"
        events = self.shared.events
        if events.admit("unmatched_allowed"):
            events.emit_admitted(
                "unmatched_allowed",
                tenant=tenant,
                tier=verdict.tier,
                app=self.app,
                method=head.method,
                path_shape=path_shape(path),
                request_id=head.request_id or request_id(),
                revision=rules.revision,
            )

    def _prefix(
        self,
        decision: Decision,
        rules: Rules,
        facts: tuple[str, str] | None,
        route: Route | None,
    ) -> bytes:
        """The problem+json body up to the request id, encoded once per distinct denial."""
        upgrade = rules.policy.upgrade_url
        roles = route.roles if decision.code == "role_forbidden" and route is not None else None
        key = (
            decision.code,
            decision.detail,
            decision.feature,
            decision.tier,
            decision.required_tier,
            decision.addon,
            decision.upsell,
            upgrade,
            facts,
            roles,
        )
        cached = self._bodies.get(key)
        if cached is None:
            cached = decision_prefix(decision, self.app, upgrade, facts, route)
            bounded_put(self._bodies, key, cached, 4096)
        return cached

    def _upgrade_parts(
        self,
        decision: Decision,
        rules: Rules,
        facts: tuple[str, str] | None,
        route: Route | None,
    ) -> UpgradeParts:
        """A feature block's body around the request id (``_prefix``, then the upgrade
        link), encoded once per distinct block."""
        upgrade = rules.policy.upgrade_url
        key = (
            decision.feature,
            decision.tier,
            decision.detail,
            decision.required_tier,
            decision.addon,
            upgrade,
            facts,
        )
        cached = self._upgrades.get(key)
        if cached is None:
            assert decision.feature is not None
            prefix = self._prefix(decision, rules, facts, route)
            cached = upgrade_parts(prefix, upgrade, decision.feature)
            bounded_put(self._upgrades, key, cached, 4096)
        return cached

    def fast_refusal(
        self,
        head: RequestHead,
        error: LicenseError,
        target: RefusalTarget,
        rules: Rules,
        quick: bool = False,
    ) -> Verdict:
        """401 for a refused key at a target where every refused key gets that answer: the
        same body, metrics and (sampled) event as the full path, without the path work.
        ``quick``: the error is a ``LicenseCache.quick_refusal``, counted here with the
        answer. What does not change from one refusal to the next is looked up once per
        distinct refusal, and the verdict built with all its fields at once: a flood pays
        this for every key."""
        fast = (quick and self._fast_quick.get(error)) or self._fast_answer(error, rules, quick)
        prefix, status, extra, outcome, tally = fast
        tally.n += 1  # Tally.inc, inlined
        rid = head.request_id or request_id()
        found, path, name = target
        limit = self._invalid_limit
        if limit is not None and monotonic() < limit.empty_until:
            self._invalid_dropped.n += 1  # sampled out, as admit counts it, without asking it
        elif self._admit_invalid("license_invalid"):
            self.refusals.write(
                "license_invalid", head, rid, rules.revision, code=error.reason,
                route=found.route, tenant=None, license=None, policy=rules.policy,
                now=time.time(), reason=error.reason, detail=error.detail,
            )  # fmt: skip
        # Every field in order: positional is the cheapest way to build a Struct.
        return Verdict(
            RESPOND, status, prefix + _encode(rid) + b"}", b"", b"", extra, outcome,
            PROBLEM_JSON, _KEEP_ALL, False, 0, path, name, None, None, None, error.reason,
        )  # fmt: skip

    def _fast_answer(self, error: LicenseError, rules: Rules, quick: bool) -> _FastAnswer:
        """What every ``fast_refusal`` with this error shares, by reason and detail; for a
        ``quick`` refusal (whose key result and cache miss ``resolve`` did not count), with
        all three counts in one tally, kept by the error object."""
        fast = self._fast.get((error.reason, error.detail))
        if fast is None:
            status = STATUS[error.reason]  # 401, or 503 for license_check_busy
            decision = Decision(
                allowed=False, status=status, code=error.reason, detail=error.detail
            )
            prefix = self._prefix(decision, rules, None, None)
            outcome = "rejected" if status == 503 else "unlicensed"
            extra = b"Retry-After: 1\r\n" if status == 503 else b""
            fast = (prefix, status, extra, outcome, self.metrics.outcome[outcome])
            bounded_put(self._fast, (error.reason, error.detail), fast, 1024)
        if quick:
            metrics = self.shared.metrics
            counts = metrics.joint_tally(
                fast[4], metrics.license_result[error.reason], metrics.cache_miss
            )
            fast = (*fast[:4], counts)
            bounded_put(self._fast_quick, error, fast, 1024)
        return fast

    def identity_refusal(
        self, head: RequestHead, error: IdentityError, found: RouteMatch, rules: Rules, now: float
    ) -> Verdict:
        """401 identity_untrusted / identity_invalid (or 400 for a tenant id not UTF-8)."""
        outcome = "unlicensed" if error.status == 401 else "rejected"
        return self.refuse(
            error.status, error.code, error.title, error.detail, head,
            outcome=outcome, found=found, now=now,
        )  # fmt: skip

    def mismatch(
        self,
        head: RequestHead,
        found: RouteMatch,
        rules: Rules,
        lic: License,
        claimed: bytes | str,
        now: float,
    ) -> Verdict:
        tenant = claimed if isinstance(claimed, str) else claimed.decode("utf-8", "replace")
        error = TENANT_MISMATCH
        return self.refuse(
            error.status, error.code, error.title, error.detail, head, outcome="blocked",
            found=found, tenant=tenant, license=lic, now=now, key_tenant=lic.claims.sub,
        )  # fmt: skip

    def check_addons(
        self, head: RequestHead, lic: License, found: RouteMatch, rules: Rules, now: float
    ) -> None:
        """An add-on the key's tier cannot buy grants nothing (``decide`` leaves it out);
        say so once per key, as ``license_invalid`` with code ``addon_not_available``."""
        reported = self.shared.addons_reported
        if lic.fingerprint in reported:
            return
        bounded_put(reported, lic.fingerprint, True, 100_000)
        claims = lic.claims
        usable = rules.matrix.usable_addons(claims.tier, claims.addons)
        dropped = [name for name in claims.addons if name not in usable]
        if dropped:
            rid = head.request_id or request_id()
            self.refusals.emit(
                "license_invalid", head, rid, rules.revision, code="addon_not_available",
                route=found.route, tenant=claims.sub, license=lic, policy=rules.policy,
                now=now, reason="addon_not_available", addons=dropped,
                detail=f"not sold to the {claims.tier} tier: {', '.join(dropped)} (ignored)",
            )  # fmt: skip

    def refuse(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        head: RequestHead,
        outcome: str = "rejected",
        extra: bytes = b"",
        found: RouteMatch | None = None,
        tenant: str | None = None,
        license: License | None = None,
        now: float | None = None,
        **fields: Any,
    ) -> Verdict:
        """An answer given outside ``decide`` (bad header, path, identity, mismatch, store
        outage): its body, metric and sampled event."""
        self.metrics.outcome[outcome].inc()
        rid = head.request_id or request_id()
        rules = self.shared.rules
        now = time.time() if now is None else now
        route = found.route if found is not None else None
        facts = self.refusals.facts(rules.policy, license, now) if license is not None else None
        body_fields = {"license_state": facts[0], "expires_at": facts[1]} if facts else {}
        body = with_request_id(problem_prefix(status, code, title, detail, **body_fields), rid)
        self.refusals.emit(
            code, head, rid, rules.revision, code=code, route=route, tenant=tenant,
            license=license, policy=rules.policy, now=now, detail=detail, **fields,
        )  # fmt: skip
        return respond(status, body, extra, outcome, route, code, tenant=tenant)


def respond(
    status: int,
    body: bytes,
    extra: bytes,
    outcome: str,
    route: Route | None,
    code: str,
    feature: str | None = None,
    tenant: str | None = None,
    tier: str | None = None,
) -> Verdict:
    """A RESPOND verdict, with the access log's fields (all at once and in order:
    positional is the cheapest way to build a Struct)."""
    path, name = (None, None) if route is None else (route.path, route.name)
    return Verdict(
        RESPOND, status, body, b"", b"", extra, outcome, PROBLEM_JSON, _KEEP_ALL, False, 0,
        path, name, feature, tenant, tier, code,
    )  # fmt: skip
