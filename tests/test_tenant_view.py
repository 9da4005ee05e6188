"""Tenant views and reconciliation with billing: pure functions of (record, policy, now), so
every state is built here from real signed keys, no store needed."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.csvrows import CsvError
from gateway.decision import Policy, TenantRecord
from gateway.license import KeyRing, License, Seats
from gateway.matrix import TierMatrix
from gateway.tenant_view import (
    BillingRow,
    Drift,
    SeatView,
    TenantView,
    read_billing,
    reconcile,
    tenant_view,
)
from tests.conftest import IssueKey

DAY = 86400
NOW = int(time.time())


@pytest.fixture
def policy(matrix: TierMatrix) -> Policy:
    return Policy(matrix=matrix)


MakeLicense = Callable[..., License]


@pytest.fixture
def lic(issue_key: IssueKey, keyring: KeyRing) -> MakeLicense:
    """``lic(tier="fleet", serial=2, ...)`` → a verified license of tenant ``acme``."""

    def make(**claims: object) -> License:
        return keyring.verify(issue_key(**{"sub": "acme", **claims}))

    return make


def view_of(policy: Policy, *licenses: License, **record: object) -> TenantView:
    ordered = tuple(sorted(licenses, key=lambda item: -item.claims.serial))
    return tenant_view(TenantRecord("acme", licenses=ordered, **record), policy, NOW)  # type: ignore[arg-type]


def statuses(view: TenantView) -> dict[str, str]:
    return {item.license_id: item.status for item in view.licenses}


def test_each_license_is_flagged_in_force_scheduled_superseded_expired_or_revoked(
    policy: Policy, lic: MakeLicense
) -> None:
    make = lic
    old = make(jti="old", tier="core", serial=1, nbf=NOW - 90 * DAY, exp=NOW + 90 * DAY)
    ended = make(jti="ended", tier="fleet", serial=2, nbf=NOW - 90 * DAY, exp=NOW - DAY, trial=True)
    current = make(jti="current", tier="fleet", serial=3, addons=("emergency_support",))
    cancelled = make(jti="cancelled", tier="enterprise", serial=4)
    later = make(jti="later", tier="core", serial=5, nbf=NOW + 30 * DAY, exp=NOW + 400 * DAY)

    view = view_of(policy, old, ended, current, cancelled, later, revoked=frozenset({"cancelled"}))

    assert statuses(view) == {
        "later": "scheduled",
        "cancelled": "revoked",
        "current": "in_force",
        "ended": "expired",
        "old": "superseded",
    }
    assert [item.license_id for item in view.licenses] == [
        "later", "cancelled", "current", "ended", "old",
    ]  # fmt: skip
    assert (view.state, view.current, view.tier, view.addons) == (
        "active",
        "current",
        "fleet",
        ("emergency_support",),
    )
    assert view.revoked == ("cancelled",)
    assert [item.trial for item in view.licenses if item.license_id == "ended"] == [True]


def test_a_trial_in_force_is_flagged(policy: Policy, lic: MakeLicense) -> None:
    view = view_of(policy, lic(tier="enterprise", trial=True, exp=NOW + 14 * DAY))
    assert view.state == "active" and view.trial and view.tier == "enterprise"


def test_seat_limits_stand_next_to_usage(policy: Policy, lic: MakeLicense) -> None:
    fleet = lic(tier="fleet")
    assert view_of(policy, fleet).seats == {
        "ops_users": SeatView(used=None, included=5),
        "drivers": SeatView(used=None, included=5),
    }
    used = view_of(policy, fleet, usage=Seats(ops_users=5, drivers=2))
    assert used.seats == {
        "ops_users": SeatView(used=5, included=5),
        "drivers": SeatView(used=2, included=5),
    }
    extra = lic(tier="fleet", seats=Seats(ops_users=12, drivers=40), serial=2)
    assert view_of(policy, extra, usage=Seats(3, 4)).seats["drivers"] == SeatView(4, 40)


def test_a_grandfather_window_shows_the_tier_granted_and_until_when(
    policy: Policy, lic: MakeLicense
) -> None:
    until = NOW + 30 * DAY
    window = lic(tier="fleet", grandfather_tier="enterprise", grandfather_until=until)
    view = view_of(policy, window)
    assert (view.tier, view.effective_tier, view.grandfathered_until) == (
        "fleet",
        "enterprise",
        until,
    )
    assert view.seats["ops_users"].included == 10  # the window's tier's seats

    ended = lic(tier="fleet", grandfather_tier="enterprise", grandfather_until=NOW - DAY)
    after = view_of(policy, ended)
    assert (after.effective_tier, after.grandfathered_until) == ("fleet", None)
    assert after.seats["ops_users"].included == 5


def test_a_paid_license_past_grace_is_restricted_to_the_lowest_tier(
    policy: Policy, lic: MakeLicense
) -> None:
    lapsed = lic(
        tier="fleet", addons=("emergency_support",), seats=Seats(9, 9),
        nbf=NOW - 400 * DAY, exp=NOW - 30 * DAY,
    )  # fmt: skip
    view = view_of(policy, lapsed)
    assert (view.state, view.tier, view.effective_tier, view.addons) == (
        "restricted",
        "fleet",
        "core",
        (),
    )
    assert view.seats["drivers"].included == 1  # Core's, not the license's
    assert view.note is not None and "restricted" in view.note
    in_grace = view_of(policy, lic(tier="fleet", nbf=NOW - 400 * DAY, exp=NOW - DAY))
    assert (in_grace.state, in_grace.effective_tier) == ("grace", "fleet")


def test_an_ended_trial_is_expired(policy: Policy, lic: MakeLicense) -> None:
    view = view_of(policy, lic(tier="enterprise", trial=True, nbf=NOW - 20 * DAY, exp=NOW - DAY))
    assert (view.state, view.current, view.effective_tier, view.seats) == (
        "expired",
        view.licenses[0].license_id,
        None,
        {},
    )


def test_a_suspended_tenant_keeps_showing_its_plan(policy: Policy, lic: MakeLicense) -> None:
    view = view_of(policy, lic(tier="fleet"), suspended=True)
    assert (view.state, view.suspended, view.tier, view.effective_tier) == (
        "suspended",
        True,
        "fleet",
        "fleet",
    )


def test_nothing_in_force(policy: Policy, lic: MakeLicense) -> None:
    assert view_of(policy).state == "none"
    scheduled = lic(nbf=NOW + 10 * DAY, exp=NOW + 20 * DAY)
    view = view_of(policy, scheduled)
    assert (view.state, view.current, view.tier) == ("scheduled", None, None)
    assert view_of(policy, suspended=True).state == "suspended"


# -- reconciliation ---------------------------------------------------------------------------


def row(tenant: str = "acme", tier: str = "fleet", **fields: object) -> BillingRow:
    """A billing line; by default the plan of ``current`` below (Fleet with two add-ons)."""
    values: dict[str, object] = {
        "addons": ("emergency_support", "sms_messaging"),
        "ops_users": None, "drivers": None, "ends_at": None, "line": 2,
    }  # fmt: skip
    values.update(fields)
    return BillingRow(tenant=tenant, tier=tier, **values)  # type: ignore[arg-type]


def day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


@pytest.mark.parametrize(
    ("billing", "drift"),
    [
        pytest.param(row(), [], id="agree"),
        pytest.param(row(addons=("sms_messaging", "emergency_support")), [], id="addon-order"),
        pytest.param(row(ops_users=5, drivers=5), [], id="tier-seats-explicit"),
        pytest.param(row(ends_at=NOW + 365 * DAY), [], id="same-day"),
        pytest.param(
            row(tier="enterprise"),
            [
                Drift("acme", "tier", "enterprise", "fleet"),
                Drift("acme", "ops_users", "10", "5"),
                Drift("acme", "drivers", "10", "5"),
            ],
            id="tier",
        ),  # fmt: skip
        pytest.param(
            row(addons=("emergency_support",)),
            [Drift("acme", "addons", "emergency_support", "emergency_support,sms_messaging")],
            id="addons",
        ),
        pytest.param(
            row(drivers=5, ops_users=8), [Drift("acme", "ops_users", "8", "5")], id="seats"
        ),
        pytest.param(
            row(ends_at=NOW + 30 * DAY),
            [Drift("acme", "ends_at", day(NOW + 30 * DAY), day(NOW + 365 * DAY))],
            id="ends-at",
        ),
    ],
)
def test_reconcile_one_tenant(
    billing: BillingRow, drift: list[Drift], policy: Policy, lic: MakeLicense, matrix: TierMatrix
) -> None:
    current = lic(tier="fleet", addons=("sms_messaging", "emergency_support"), exp=NOW + 365 * DAY)
    assert reconcile([billing], {"acme": view_of(policy, current)}, matrix) == drift


def test_reconcile_tenants_on_one_side_only_and_states_that_deny(
    policy: Policy, matrix: TierMatrix, issue_key: IssueKey, keyring: KeyRing
) -> None:
    def view(tenant: str, **fields: object) -> TenantView:
        licenses = fields.pop("licenses", ())
        record = TenantRecord(tenant, licenses=licenses, **fields)  # type: ignore[arg-type]
        return tenant_view(record, policy, NOW)

    def license_of(tenant: str, **claims: object) -> tuple[License, ...]:
        return (keyring.verify(issue_key(sub=tenant, **claims)),)

    views = {
        "paused": view("paused", suspended=True, licenses=license_of("paused")),
        "lapsed": view(
            "lapsed", licenses=license_of("lapsed", trial=True, exp=NOW - DAY, nbf=NOW - 9 * DAY)
        ),
        "empty": view("empty"),
        "unbilled": view("unbilled", licenses=license_of("unbilled", tier="fleet")),
        "no-license-unbilled": view("no-license-unbilled"),
    }  # fmt: skip
    billing = [
        row("paused", tier="core", addons=()),
        row("lapsed", tier="core", addons=()),
        row("empty", tier="core", addons=()),
        row("missing", tier="fleet", line=7),
    ]
    assert reconcile(billing, views, matrix) == [
        Drift("paused", "state", "active", "suspended"),
        Drift("lapsed", "state", "active", "expired"),
        Drift("empty", "license", "core", "none in force (none)"),
        Drift("missing", "tenant", "fleet (line 7)", "absent"),
        Drift("unbilled", "tenant", "absent", "fleet (active)"),
    ]


def test_read_billing(tmp_path: Path) -> None:
    export = tmp_path / "export.csv"
    export.write_text(
        "\ufeff# billing export\n"
        "Tenant, Tier, Addons, ops_users, drivers, ends_at\n"
        'acme, fleet, "emergency_support,sms_messaging", 8, 20, 2027-06-30\n'
        "\n"
        "globex,core,route_distribution;sms_messaging,,,\n"
    )
    assert read_billing(export) == [
        BillingRow(
            "acme", "fleet", ("emergency_support", "sms_messaging"), 8, 20,
            int(datetime(2027, 6, 30, tzinfo=UTC).timestamp()), line=3,
        ),
        BillingRow(
            "globex", "core", ("route_distribution", "sms_messaging"), None, None, None, line=5
        ),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param("tenant,tier\n", None, id="header-only-is-empty-export"),
        pytest.param("", "empty", id="empty"),
        pytest.param("tenant,addons\nacme,\n", "missing column(s) tier", id="missing-column"),
        pytest.param("tenant,tier,plan\n", "unknown column(s) plan", id="unknown-column"),
        pytest.param(
            "tenant,tier,ops_users\nacme,core,three\n", ":2 [ops_users]: 'three'", id="count"
        ),
        pytest.param("tenant,tier,ends_at\nacme,core,30/06/2027\n", ":2 [ends_at]", id="date"),
        pytest.param("tenant,tier\nacme,core\nacme,fleet\n", "also on line 2", id="duplicate"),
        pytest.param("tenant,tier\n,core\n", ":2 [tenant]: must not be empty", id="empty-tenant"),
        pytest.param("tenant,tier\nacme,core,x\n", "3 values for 2 columns", id="extra-cell"),
    ],
)
def test_read_billing_names_the_line_and_column(
    tmp_path: Path, text: str, error: str | None
) -> None:
    export = tmp_path / "export.csv"
    export.write_text(text)
    if error is None:
        assert read_billing(export) == []
        return
    with pytest.raises(CsvError, match=re.escape(error)):
        read_billing(export)
