"""What the gateway would do with one request, step by step, without a network.

``gateway explain`` and ``gateway test`` both call ``evaluate``, which takes the proxy's
steps with the proxy's own functions: ``gateway.classify.classify`` (a classic key, the
canonical path, a classic path prefix, the route look-up) and the pure ``decide``, on the
tenant record the store holds when one is given, so what they report is what the proxy
would do.

    found = evaluate(config, "operations", "POST", "/api/v1/shipments/1/optimize",
                     license=hypothetical_license(config.matrix, "core", ()))
    found.code, found.status        # "feature_not_entitled", 403
    explanation_document(found, config)["route"]["name"]   # "ops.shipment.optimize"
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from msgspec.structs import replace

from gateway.classify import ASK_STORE, CLASSIC_KEY, CLASSIC_PATH, REJECTED, ClassicRules, classify
from gateway.config import Config
from gateway.decision import STATUS, Decision, TenantRecord, decide
from gateway.errors import LicenseError
from gateway.license import License, LicenseClaims
from gateway.matrix import AppName, TierMatrix
from gateway.routes import Match, Route, RouteMatch, sorted_methods


class Explanation(msgspec.Struct, frozen=True):
    """One request's way through the gateway. Exactly one of ``classic``, ``rejected`` and
    ``decision`` ends it."""

    app: AppName
    method: str
    target: str
    unmatched: str
    canonical_path: str | None = None
    found: RouteMatch | None = None
    decision: Decision | None = None
    classic: str | None = None  # "key" or "path": forwarded untouched, not decided
    rejected: str | None = None  # why the path was refused (400 path_rejected)

    @property
    def code(self) -> str:
        """``classic``, ``path_rejected`` or the decision's code (``allowed``, ``public``,
        a reason code)."""
        if self.classic is not None:
            return "classic"
        if self.rejected is not None:
            return "path_rejected"
        assert self.decision is not None
        return self.decision.code

    @property
    def allowed(self) -> bool:
        """Forwarded to the upstream (classic traffic included)."""
        return self.classic is not None or (self.decision is not None and self.decision.allowed)

    @property
    def status(self) -> int | None:
        """The gateway's status; None when it forwards without deciding (classic)."""
        if self.rejected is not None:
            return 400
        return self.decision.status if self.decision is not None else None


def hypothetical_license(
    matrix: TierMatrix, tier: str, addons: tuple[str, ...], now: float | None = None
) -> License:
    """A valid license of ``tier`` with ``addons``, as if a key had been presented."""
    if tier not in matrix.tiers:
        raise ValueError(f"unknown tier {tier!r} (known: {', '.join(matrix.tiers)})")
    at = int(time.time() if now is None else now)
    claims = LicenseClaims(
        iss="explain", sub="(hypothetical)", jti="-", iat=at, nbf=at, exp=at + 86400,
        tier=tier, serial=0, addons=addons,
    )  # fmt: skip
    return License(claims, kid="-", fingerprint="-")


def evaluate(
    config: Config,
    app: AppName,
    method: str,
    target: str,
    *,
    key: str | None = None,
    license: License | None = None,
    role: str | None = None,
    now: float | None = None,
    tenant: str | None = None,
    record: TenantRecord | None = None,
    classic_known: bool | None = None,
) -> Explanation:
    """Decide one request as the proxy would. ``key`` is a license key as a client sends it
    (classic keys included); ``license`` a hypothetical one; neither: no license.
    ``tenant`` is the tenant id header; ``record`` what the tenant store holds for the
    request's tenant (the key's, or ``tenant``'s), None: nothing. ``classic_known``: with
    ``license.classic_keys = "store"``, whether the store imported ``key`` as a classic key
    (None: the store could not say, and the proxy then forwards it, fail-static)."""
    app_routes = config.routes.apps[app]
    method = method.upper()
    base = Explanation(app, method, target, app_routes.unmatched)
    rules = ClassicRules.for_app(config, app)
    raw_key = None if key is None else key.encode("utf-8", "surrogateescape")
    raw_target = target.encode("utf-8", "surrogateescape")
    step = classify(rules, app_routes, method, raw_target, raw_key)
    if step is ASK_STORE:
        known = True if classic_known is None else classic_known
        step = classify(rules, app_routes, method, raw_target, raw_key, known)
    if step.kind == CLASSIC_KEY:
        return replace(base, classic="key")
    if step.kind == REJECTED:
        return replace(base, rejected=step.reason)
    if step.kind == CLASSIC_PATH:
        return replace(base, canonical_path=step.path, classic="path")
    found = step.found
    assert found is not None
    at = time.time() if now is None else now
    presented: License | LicenseError | None = license
    if key is not None:
        try:
            presented = config.keyring.verify(key)
        except LicenseError as exc:
            presented = exc
    if isinstance(presented, License) and tenant is not None and tenant != presented.claims.sub:
        mismatch = Decision(
            allowed=False,
            status=STATUS["tenant_mismatch"],
            code="tenant_mismatch",
            detail="the license key belongs to another tenant than the tenant header names",
        )
        return replace(base, canonical_path=step.path, found=found, decision=mismatch)
    decision = decide(config.policy, found, app_routes.unmatched, presented, record, role, at)
    return replace(base, canonical_path=step.path, found=found, decision=decision)


def route_document(route: Route, config: Config) -> dict[str, Any]:
    return {
        "name": route.name,
        "key": route.key,
        "pattern": route.path,
        "public": route.public,
        "file": config.routes.file,
        "line": route.line,
        "methods": sorted_methods(route.methods) if route.methods is not None else None,
    }


def explanation_document(found: Explanation, config: Config) -> dict[str, Any]:
    """``explain --json``: snake_case keys, the same fields whatever the outcome."""
    match = found.found
    route = match.route if match is not None else None
    decision = found.decision
    doc: dict[str, Any] = {
        "request": {"app": found.app, "method": found.method, "path": found.target},
        "canonical_path": found.canonical_path,
        "match": match.kind.name.lower() if match is not None else None,
        "route": route_document(route, config) if route is not None else None,
        "shared_path_routes": [
            route_document(shared, config) for shared in (match.shared if match else ())
        ],
        "unmatched_policy": found.unmatched,
        "feature": decision.feature if decision is not None else None,
        "license": None,
        "decision": {
            "allowed": found.allowed,
            "status": found.status,
            "code": found.code,
            "reason": _reason(found),
        },
        "warning": decision.warning if decision is not None else None,
        "unlock": None,
        "upsell": decision.upsell if decision is not None else True,
    }
    if route is not None and match is not None and decision is not None:
        # The feature the route gates this request by: a method the route does not list
        # is gated by it too, unless the unmatched policy refuses it outright.
        gates = match.kind is Match.FULL or found.unmatched == "allow"
        doc["feature"] = route.feature if gates else None
    if decision is not None and decision.license is not None:
        claims = decision.license.claims
        doc["license"] = {
            "tenant": claims.sub,
            "tier": claims.tier,
            "addons": list(claims.addons),
            "license_id": claims.jti,
            "fingerprint": decision.license.fingerprint,
        }
    if decision is not None and decision.code == "feature_not_entitled":
        doc["unlock"] = {
            "required_tier": decision.required_tier,
            "addon": decision.addon,
            "text": _unlock_text(decision, config),
        }
    return doc


def explanation_lines(found: Explanation, config: Config) -> list[tuple[str, str]]:
    """``explain`` for people: one labelled line per step."""
    lines = [("request", f"{found.app} {found.method} {found.target}")]
    if found.classic == "key":
        lines.append(("decision", "CLASSIC: forwarded untouched, no gating"))
        return lines
    if found.rejected is not None:
        lines.append(("decision", f"DENY 400 path_rejected ({found.rejected})"))
        return lines
    assert found.canonical_path is not None
    lines.append(("canonical path", found.canonical_path))
    if found.classic == "path":
        lines.append(("decision", "CLASSIC: a classic path prefix, forwarded untouched"))
        return lines
    match, decision = found.found, found.decision
    assert match is not None and decision is not None
    route = match.route
    if match.shared:
        names = ", ".join(shared.label for shared in match.shared)
        lines.append(
            (
                "route",
                f"none: the path's routes ({names}) do not list {found.method} "
                f"(unmatched policy: {found.unmatched})",
            )
        )
    elif route is None:
        lines.append(("route", f"none (unmatched policy: {found.unmatched})"))
    else:
        kind = "match" if match.kind is Match.FULL else "path matches, method does not"
        name = f"{route.name}, " if route.name else ""
        where = f", {config.routes.file} line {route.line}" if route.line else ""
        lines.append(("route", f"{route.path} [{name}{route.key}{where}] ({kind})"))
        if match.kind is Match.FULL:
            lines.append(("feature", "public" if route.public else route.feature or "(ungated)"))
    if decision.license is not None:
        claims = decision.license.claims
        addons = f" + {', '.join(claims.addons)}" if claims.addons else ""
        lines.append(("license", f"tenant {claims.sub}, tier {claims.tier}{addons}"))
    verdict = "ALLOW" if decision.allowed else "DENY"
    lines.append(("decision", f"{verdict} {decision.status} {decision.code}"))
    if decision.detail:
        lines.append(("reason", decision.detail))
    if decision.warning:
        lines.append(("warning", decision.warning))
    if decision.code == "feature_not_entitled":
        lines.append(("unlock", _unlock_text(decision, config)))
        if not decision.upsell:
            lines.append(("note", "dispatch_only: the answer carries no upsell fields"))
    return lines


def _reason(found: Explanation) -> str | None:
    if found.classic == "key":
        return "classic key: forwarded untouched, no gating"
    if found.classic == "path":
        return "classic path prefix: forwarded untouched, no gating"
    if found.rejected is not None:
        return found.rejected
    assert found.decision is not None
    return found.decision.detail or None


def _unlock_text(decision: Decision, config: Config) -> str:
    unlock: list[str] = []
    if decision.required_tier:
        tier = config.matrix.tiers[decision.required_tier]
        unlock.append(f"upgrade to {tier.title} (${tier.price_usd_month:,.0f}/mo)")
    if decision.addon:
        addon = config.matrix.addons[decision.addon]
        price = addon.prices.get(decision.tier or "", "")
        unlock.append(f"buy the {addon.title} add-on ({price})")
    return " or ".join(unlock) or "not available"
