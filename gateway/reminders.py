"""Reminders before a license, a trial or a grandfather window ends: ``license_expiring``.

A background task of the runtime scans the store's tenants every ``interval_seconds``; for
the license in force of each (``decision.current_license``, the one requests are decided
on) it finds what ends next — the license's ``exp`` (kind ``license``, or ``trial`` for a
trial key) and a grandfather window that raises the tier (kind ``grandfather``) — and, once
the end is within a lead time of ``[reminders] lead_days``, emits one ``license_expiring``
event for the shortest lead time that has been reached. A gateway that starts five days
before an end sends the 7-day reminder only, never a late 30-day one.

Exactly once per tenant, license, kind and lead time across a fleet: before emitting, the
gateway claims ``reminder:<tenant>:<license id>:<kind>:<days>`` with the store's atomic
``claim_event`` (the table that deduplicates provisioning events); whoever claims it first
emits it, every other process and every later scan skips it. A claim made at most ``days``
before the end has to outlive that end, hence ``config.MAX_LEAD_DAYS`` (the store's 30 days).
A process that dies between the claim and the write loses that reminder rather than sending
it twice.

    reminders = Reminders(store, events, lambda: shared.rules.policy, settings.reminders)
    reminders.start()
    await reminders.aclose(deadline=5.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import msgspec

from gateway.decision import Policy, TenantRecord, current_license, effective_plan
from gateway.events import EventLog
from gateway.license import License
from gateway.metrics import Metrics
from gateway.store import StoreError, TenantStore
from gateway.tasks import finish_within

if TYPE_CHECKING:
    from gateway.config import ReminderSettings

log = logging.getLogger(__name__)

DAY = 86400
YIELD_EVERY = 200  # tenants evaluated between two yields to the event loop
MAX_SETTLED = 100_000  # claim ids this process remembers having settled (then forgets all)

ReminderKind = Literal["license", "trial", "grandfather"]
# What happens at the end: the license's expiry strategy, or the grandfather window closing.
Then = Literal["restrict", "revoke", "maintain", "downgrade"]


class Reminder(msgspec.Struct, frozen=True):
    """One ``license_expiring`` event (field order is the event's key order)."""

    tenant: str
    tier: str  # the tier served now (raised by a grandfather window while it lasts)
    license_id: str
    kind: ReminderKind
    lead_days: int  # the lead time reached: one of [reminders] lead_days
    days_left: int  # whole days to ends_at, a started day counted
    ends_at: int  # unix seconds: the license's exp, or the grandfather window's end
    then: Then
    then_at: int | None  # when that takes effect (exp + grace for restrict; None: maintain)
    then_tier: str | None  # the tier served from then_at (None: refused, no license left)

    @property
    def claim_id(self) -> str:
        """The id that makes this reminder once-only across a fleet (``claim_event``)."""
        return f"reminder:{self.tenant}:{self.license_id}:{self.kind}:{self.lead_days}"


def due_reminders(
    record: TenantRecord, policy: Policy, lead_days: Sequence[int], now: float
) -> list[Reminder]:
    """The reminders due for ``record`` at ``now`` (pure: the scan claims and emits them)."""
    if record.suspended or not lead_days:
        return []
    skew = policy.clock_skew_seconds
    lic = current_license(None, record, now, skew)
    if lic is None or now >= lic.claims.exp:
        return []  # nothing in force, or lapsed already: grace and restriction say the rest
    plan = effective_plan(policy, lic.claims, now)
    if plan is None:
        return []
    found: list[Reminder] = []
    claims = lic.claims
    ends: list[tuple[ReminderKind, int, Then, int | None]] = []
    strategy = claims.expiry_strategy
    if strategy == "restrict":
        then_at: int | None = claims.exp + policy.grace_seconds
    else:
        then_at = None if strategy == "maintain" else claims.exp
    ends.append(("trial" if claims.trial else "license", claims.exp, strategy, then_at))
    window = claims.grandfather_until
    if plan.state == "grandfathered" and window is not None and window < claims.exp:
        ends.append(("grandfather", window, "downgrade", window))
    for kind, ends_at, then, at in ends:
        remaining = ends_at - now
        reached = [days for days in lead_days if remaining <= days * DAY]
        if remaining <= 0 or not reached or _renewed(lic, record, ends_at, skew):
            continue
        found.append(
            Reminder(
                tenant=record.tenant,
                tier=plan.tier,
                license_id=claims.jti,
                kind=kind,
                lead_days=min(reached),
                days_left=math.ceil(remaining / DAY),
                ends_at=ends_at,
                then=then,
                then_at=at,
                then_tier=_tier_at(record, policy, at if at is not None else ends_at),
            )
        )
    return found


def _renewed(lic: License, record: TenantRecord, at: int, skew: int) -> bool:
    """Does a newer license (a renewal or an upgrade, scheduled or not) govern at ``at``?
    Then nothing ends for the customer: no reminder. (An older paid license a trial falls
    back to is no renewal: the trial's end is still news.)"""
    after = current_license(None, record, at, skew)
    return after is not None and after.claims.serial > lic.claims.serial and after.claims.exp > at


def _tier_at(record: TenantRecord, policy: Policy, at: int) -> str | None:
    """The tier the decision serves at ``at`` (None: every request refused)."""
    lic = current_license(None, record, at, policy.clock_skew_seconds)
    if lic is None:
        return None
    plan = effective_plan(policy, lic.claims, at)
    return plan.tier if plan is not None else None


class Reminders:
    """The scan as a background task; ``start`` and ``aclose`` bracket it, and the task is
    held here. Never on the request path: it reads the store in bulk and yields often."""

    def __init__(
        self,
        store: TenantStore,
        events: EventLog,
        policy: Callable[[], Policy],
        settings: ReminderSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.events = events
        self.settings = settings
        self.scans = 0  # completed scans (tests wait for a number of them)
        self.sent = 0  # reminders this process claimed and emitted
        self._policy = policy
        self._errors = metrics.store_errors.labels(op="reminders") if metrics else None
        # Claim ids this process has settled (claimed, or found claimed): not asked again.
        self._settled: set[str] = set()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.settings.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reminders")

    async def aclose(self, deadline: float) -> None:
        """Stop after the reminder being sent, if any (a claimed reminder is always
        emitted), waiting up to ``deadline`` seconds for a slow store; then cancel."""
        self._closing = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            await finish_within(task, deadline)

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self.scan()
            except Exception:  # a defect must not end reminders for the life of the process
                log.exception("reminders: the scan failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.interval_seconds):
                    await self._wakeup.wait()

    async def scan(self) -> None:
        """One pass over every tenant; a store failure ends the pass (the next one retries)."""
        try:
            records = await self.store.list_tenants()
            policy, lead_days, now = self._policy(), self.settings.lead_days, time.time()
            for index, record in enumerate(records):
                if self._closing:
                    return
                if index % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # a large fleet of tenants never holds the loop
                for reminder in due_reminders(record, policy, lead_days, now):
                    await self._send(reminder)
        except StoreError as exc:
            if self._errors is not None:
                self._errors.inc()
            log.warning("reminders: the tenant store did not answer (%s); next scan retries", exc)
            return
        self.scans += 1

    async def _send(self, reminder: Reminder) -> None:
        claim_id = reminder.claim_id
        if claim_id in self._settled:
            return
        fields = msgspec.structs.asdict(reminder)  # before the claim: nothing fails after it
        claimed = await self.store.claim_event(claim_id)
        if len(self._settled) >= MAX_SETTLED:
            self._settled.clear()  # the store still remembers: at worst a claim is re-asked
        self._settled.add(claim_id)
        if claimed:
            self.sent += 1
            self.events.emit("license_expiring", **fields)
            log.info(
                "reminder: %s %s %s ends in %d days (lead time %d)",
                reminder.tenant, reminder.kind, reminder.license_id,
                reminder.days_left, reminder.lead_days,
            )  # fmt: skip
