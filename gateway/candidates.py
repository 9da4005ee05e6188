"""The candidate configuration in shadow (``[candidate]``, README "Rolling out"): every
request the live rules decide is decided again with the candidate route table and tier
matrix, and the differences are counted and sampled — never acted on.

    gateway_candidate_diff_total{app, change}   change = newly_blocked | newly_allowed
                                                         | feature_changed
    {"event": "decision_diff", "change": ..., "route": ..., "candidate_route": ...,
     "feature": ..., "candidate_feature": ..., "decision": {...}, "candidate": {...}}

Only configured candidates cost anything: the enforcer calls ``compare`` when
``Rules.rollout.candidate`` is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.decision import Decision, TenantRecord, decide
from gateway.errors import LicenseError
from gateway.license import License
from gateway.matrix import AppName
from gateway.problems import request_id
from gateway.routes import RouteMatch

if TYPE_CHECKING:
    from gateway.enforcer import Rules, Shared
    from gateway.rollout import Candidate
    from gateway.verdict import RequestHead


def _summary(decision: Decision) -> dict[str, Any]:
    return {"allowed": decision.allowed, "status": decision.status, "code": decision.code}


class CandidateLog:
    """Decides one app's requests with the candidate and reports the differences."""

    __slots__ = ("app", "shared", "metrics")

    def __init__(self, app: AppName, shared: Shared) -> None:
        self.app = app
        self.shared = shared
        self.metrics = shared.metrics.for_app(app)

    def compare(
        self,
        candidate: Candidate,
        head: RequestHead,
        path: str,
        found: RouteMatch,
        live: Decision,
        presented: License | LicenseError | None,
        record: TenantRecord | None,
        role: str | None,
        tenant: str | None,
        rules: Rules,
        now: float,
    ) -> None:
        app_routes = candidate.routes.apps[self.app]
        other = app_routes.match(head.method, path)
        decision = decide(
            candidate.policy, other, app_routes.unmatched, presented, record, role, now
        )
        feature = found.route.feature if found.route is not None else None
        candidate_feature = other.route.feature if other.route is not None else None
        if decision.allowed != live.allowed:
            change = "newly_allowed" if decision.allowed else "newly_blocked"
        elif feature != candidate_feature:
            change = "feature_changed"
        else:
            return
        self.metrics.candidate_diff[change].inc()
        events = self.shared.events
        if not events.admit("decision_diff"):
            return
        events.emit_admitted(
            "decision_diff",
            tenant=tenant,
            tier=live.tier,
            app=self.app,
            change=change,
            method=head.method,
            route=found.route.path if found.route is not None else None,
            route_name=found.route.name if found.route is not None else None,
            candidate_route=other.route.path if other.route is not None else None,
            candidate_route_name=other.route.name if other.route is not None else None,
            feature=feature,
            candidate_feature=candidate_feature,
            decision=_summary(live),
            candidate=_summary(decision),
            request_id=head.request_id or request_id(),
            revision=rules.revision,
            candidate_revision=candidate.revision,
        )
