"""What the gateway tells the client, analytics and support when it answers a request
itself: the problem body of a denial (``decision_prefix``), and one event per refusal
(README, Events), with what the request claimed even when it failed.

Every event carries the request id the client saw, the app, the route (pattern and name),
the answer's ``code``, the tenant, and the license key: its fingerprint and ``kid``, with
``"verified": true`` for a key that verified and ``false`` for one that did not — its tenant
(``sub``) and ``kid`` are then what the key *claims*, read without trusting it, so support
can tell whose broken key it was. With a license in force, ``tier``, ``license_state`` and
``expires_at`` too. Kinds a flood could multiply are sampled before anything is built
(``EventLog.admit``); ``feature_block`` is folded into summaries instead.

    log = RefusalLog(events, "operations")
    log.emit("role_forbidden", head, rules, code="role_forbidden", route=route,
             tenant="acme", license=lic, policy=policy, now=time.time(), role="standard")
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.caches import bounded_put
from gateway.decision import Decision, Policy, allowed_roles, effective_plan
from gateway.entitlements import rfc3339
from gateway.events import EventLog
from gateway.license import License, fingerprint
from gateway.matrix import AppName
from gateway.problems import problem_prefix

if TYPE_CHECKING:
    from gateway.routes import Route
    from gateway.verdict import RequestHead


class _Claimed(msgspec.Struct):
    sub: str | None = None
    kid: str | None = None


_claimed = msgspec.json.Decoder(_Claimed)


def claimed_key(token: bytes) -> tuple[str | None, str | None]:
    """The tenant (``sub``) and ``kid`` a key claims, read without verifying anything; None
    for what cannot be read. Never raises: the key may be any bytes a client sent."""
    parts = token.split(b".")
    if len(parts) != 3:
        return None, None
    found: list[str | None] = []
    for part, field in ((parts[1], "sub"), (parts[0], "kid")):
        try:
            raw = base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
            value = getattr(_claimed.decode(raw), field)
        except (binascii.Error, ValueError, msgspec.DecodeError):
            value = None
        found.append(value if isinstance(value, str) and len(value) <= 256 else None)
    return found[0], found[1]


def license_facts(policy: Policy, lic: License, now: float) -> tuple[str, str]:
    """``license_state`` (valid, grace, maintained, restricted, grandfathered, or expired
    under the revoke strategy) and ``expires_at`` (RFC 3339) of the license in force, so
    a lapsed Fleet customer restricted to Core is not mistaken for a Core one."""
    plan = effective_plan(policy, lic.claims, now)
    return (plan.state if plan is not None else "expired"), rfc3339(lic.claims.exp)


def decision_prefix(
    decision: Decision,
    app: AppName,
    upgrade: str,
    facts: tuple[str, str] | None,
    route: Route | None,
) -> bytes:
    """The problem body of a denial by ``decide``, up to the request id (cache it) — or,
    for a feature the caller may be sold, up to the ``upgrade`` link (``with_upgrade``)."""
    fields: dict[str, Any] = {}
    if decision.feature is not None:
        fields.update(feature=decision.feature, app=app, tier=decision.tier)
    if decision.code == "role_forbidden" and route is not None and route.roles is not None:
        fields["allowed_roles"] = allowed_roles(route.roles)
    if facts is not None:
        fields.update(license_state=facts[0], expires_at=facts[1])
    last = "request_id"
    if decision.code == "feature_not_entitled" and decision.upsell:
        # the upgrade link names the request: it comes last, completed per request
        fields.update(required_tier=decision.required_tier, addon=decision.addon)
        last = "upgrade"
    return problem_prefix(
        decision.status, decision.code, decision.title, decision.detail, last=last, **fields
    )


class RefusalLog:
    """The refusal events of one app listener, and the license facts they and the problem
    bodies carry (cached per license while they cannot change)."""

    __slots__ = ("events", "app", "_facts")

    def __init__(self, events: EventLog, app: AppName) -> None:
        self.events = events
        self.app = app
        self._facts: dict[str, tuple[tuple[str, str], float]] = {}

    def facts(self, policy: Policy, lic: License, now: float) -> tuple[str, str]:
        """``license_facts``, remembered until the license could change state (its ``exp``
        or the end of a grandfather window; a lapsed license is worked out each time)."""
        found = self._facts.get(lic.fingerprint)
        if found is not None and now < found[1]:
            return found[0]
        facts = license_facts(policy, lic, now)
        claims = lic.claims
        until = claims.exp
        if claims.grandfather_until is not None and now < claims.grandfather_until:
            until = min(until, claims.grandfather_until)
        if now < until:
            bounded_put(self._facts, lic.fingerprint, (facts, until), 10_000)
        return facts

    def emit(self, kind: str, head: RequestHead, rid: str, revision: str, **fields: Any) -> None:
        """Queue one refusal event (sampled per kind; ``feature_block`` summarised); the
        fields are ``write``'s."""
        if self.admit(kind, fields.get("tenant"), fields.get("feature"), fields.get("tier")):
            self.write(kind, head, rid, revision, **fields)

    def admit(
        self,
        kind: str,
        tenant: str | None,
        feature: str | None,
        tier: str | None,
        now: float | None = None,
    ) -> bool:
        """Is this refusal to be written (``write``)? Sampled per kind; a ``feature_block``
        not written is counted into its summary. Asked before the event's fields are built:
        most blocks of a busy tenant are only counted."""
        if kind == "feature_block":
            return self.events.admit_block(tenant, feature, self.app, tier, now)
        return self.events.admit(kind)

    def write(
        self,
        kind: str,
        head: RequestHead,
        rid: str,
        revision: str,
        *,
        code: str,
        route: Route | None,
        tenant: str | None,
        license: License | None,
        policy: Policy,
        now: float,
        tier: str | None = None,
        **fields: Any,
    ) -> None:
        """Queue an event ``EventLog.admit`` (or ``admit_block``) already said yes to."""
        key: dict[str, Any]
        if license is not None:
            state, expires_at = self.facts(policy, license, now)
            key = {
                "key_fingerprint": license.fingerprint,
                "kid": license.kid,
                "verified": True,
                "license_state": state,
                "expires_at": expires_at,
            }
            tier = tier or license.claims.tier
        elif head.license_key is not None and not head.license_key.isascii():
            key = {"key_fingerprint": None, "kid": None, "verified": False}
        elif head.license_key is not None:
            claimed_tenant, kid = claimed_key(head.license_key)
            tenant = tenant or claimed_tenant
            text = head.license_key.decode("ascii")
            key = {"key_fingerprint": fingerprint(text), "kid": kid, "verified": False}
        else:
            key = {"key_fingerprint": None, "kid": None, "verified": None}
        self.events.emit_admitted(
            kind,
            tenant=tenant,
            tier=tier,
            app=self.app,
            code=code,
            route=route.path if route is not None else None,
            route_name=route.name if route is not None else None,
            request_id=rid,
            revision=revision,
            **key,
            **fields,
        )
