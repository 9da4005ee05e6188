"""Seats counted at the edge: who holds an Operations-user or a Driver seat, and whether a
new user may take one (``[seats] mode = "active_users"``, README "Seats and usage").

A seat is a distinct user id seen on the Operations listener (``ops_users``) or the Driver
App listener (``drivers``) within the last ``window_days``. The rule, pure (``judge``):

* a user who holds a seat is always allowed;
* a new user is allowed while the seats held stay within the included seats (the tier's
  quotas, or the license's ``seats`` claim, plus extra seats bought through billing);
* beyond that, up to ``floor(included × overage)`` (the allowance), the new user is allowed
  with an ``X-Seat-Warning`` header and a ``seat_overage`` event;
* beyond the allowance the new user is refused: 429 ``seat_limit_exceeded``.

At ``warning_ratio`` (90 %) of the included seats a ``seat_warning`` event goes out once per
window per tenant and seat kind, across a fleet.

``SeatBook`` keeps the holders this process has seen in memory, so a request from a holder
costs a few dict look-ups (``check``); a new user, or a holder not confirmed for
``refresh_seconds``, is admitted through the store (``admit``), atomically across every
gateway sharing it. Fail-static: when the store cannot answer, ``admit`` allows the user and
the user is counted at a request after the store is back.

The entitlements API shows the same numbers (``seats_view``): the holders the store counts
within the window (``held``, else ``await count_held``; a count is kept ``COUNT_TTL_SECONDS``
per tenant, so a polling UI does not reach the store per request) and the included seats and
allowance of ``seat_limits``, as admission uses them.

    book = SeatBook(store, config.settings.seats, metrics)
    kind = SEAT_KINDS.get(app)                     # None: this app has no seats
    if book.check(tenant, kind, user, now) is NEED_ADMISSION:
        admission = await book.admit(tenant, kind, user,
                                     matrix=matrix, tier=decision.tier, seats=decision.seats,
                                     now=now)
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Final

import msgspec

from gateway.caches import bounded_put
from gateway.config import SeatSettings
from gateway.decision import Plan
from gateway.entitlements import SeatCount, SeatsView
from gateway.events import EventLog
from gateway.license import Seats
from gateway.matrix import AppName, TierMatrix
from gateway.metrics import Metrics
from gateway.store import SeatAdmission, SeatKind, StoreError, TenantStore

log = logging.getLogger(__name__)

SEAT_KINDS: Final[dict[AppName, SeatKind]] = {"operations": "ops_users", "driver_app": "drivers"}

# What ``SeatBook.check`` answers.
KNOWN: Final = 1  # a seat holder: go on
NEED_ADMISSION: Final = 2  # await ``SeatBook.admit`` first

HOLDER_REFRESH_SECONDS = 300.0  # a cached holder is confirmed with the store this often
EXTRA_SEATS_TTL_SECONDS = 60.0  # extra seats bought, cached per tenant
REFUSAL_TTL_SECONDS = 5.0  # a refused user's retries are answered from memory meanwhile
OUTAGE_RETRY_SECONDS = 10.0  # after a store error, admit without asking it for this long
MAX_HOLDERS = 200_000  # holders cached per process (the store keeps them all)
# The seats held per tenant, for GET {prefix}: a UI polling it is answered from memory for
# this long (a release or an admission of this process counts again at once).
COUNT_TTL_SECONDS = 5.0
MAX_COUNTED = 100_000  # tenants whose count is kept

UPSELL_ROLES = frozenset({"owner", "admin"})  # who is shown how to get more seats


class SeatLimits(msgspec.Struct, frozen=True):
    """One tenant's numbers for one seat kind."""

    kind: SeatKind
    tier: str
    included: int  # the plan's (or the license's) seats plus the extra seats bought
    allowance: int  # the hard limit: floor(included × overage)
    warn_at: int  # seat_warning from this many seats held (warning_ratio of included)


def _floor(value: float) -> int:
    # 1.15 × 100 is 114.99999999999999 in binary floating point: round away that noise
    # before flooring, so the allowance is what the operator wrote.
    return math.floor(round(value, 6))


def seat_limits(
    matrix: TierMatrix,
    settings: SeatSettings,
    tier: str,
    kind: SeatKind,
    license_seats: Seats | None,
    extra: Seats | None,
) -> SeatLimits:
    """Included seats, allowance and warning mark for ``tier`` (the effective tier of the
    decision), the license's ``seats`` claim in force, and the extra seats bought."""
    plan = license_seats if license_seats is not None else matrix.tiers[tier].quotas
    included = getattr(plan, kind) + (getattr(extra, kind) if extra is not None else 0)
    overage = settings.tier_overage.get(tier, settings.overage)
    return SeatLimits(
        kind=kind,
        tier=tier,
        included=included,
        allowance=_floor(included * overage),
        warn_at=max(1, math.ceil(round(included * settings.warning_ratio, 6))),
    )


class HeldSeats(msgspec.Struct, frozen=True):
    """One tenant's seats held within the window, as the store counted them
    (``SeatBook.count_held``), and the extra seats bought, as last read."""

    used: Seats | None  # None: never counted, the store is down (the recorded usage stands in)
    extra: Seats | None


def seats_view(
    matrix: TierMatrix, settings: SeatSettings, plan: Plan, held: HeldSeats, recorded: Seats | None
) -> SeatsView:
    """``seats`` of ``GET {prefix}`` in ``active_users`` mode: ``used`` as counted (else what
    ``gateway tenant usage`` recorded), ``included`` and ``allowance`` as admission has them.
    ``plan.seats`` is the license's claim in force or the tier's quotas: the same limits."""
    used = held.used or recorded or Seats(ops_users=0, drivers=0)

    def count(kind: SeatKind) -> SeatCount:
        limits = seat_limits(matrix, settings, plan.tier, kind, plan.seats, held.extra)
        return SeatCount(limits.included, getattr(used, kind), limits.allowance)

    return SeatsView(ops_users=count("ops_users"), drivers=count("drivers"))


class Admission(msgspec.Struct, frozen=True):
    """The answer for a user who was not a known holder."""

    allowed: bool
    limits: SeatLimits
    used: int  # seats held after this admission (0 when not recorded)
    new: bool = False  # the user took a seat just now (or was refused one)
    recorded: bool = True  # False: the store did not answer; allowed fail-static
    warning: str | None = None  # the X-Seat-Warning header value
    events: tuple[str, ...] = ()  # "seat_overage", "seat_warning": for the caller to emit


def judge(result: SeatAdmission, limits: SeatLimits) -> Admission:
    """The admission rule on what the store did (it already refused beyond the allowance).
    ``seat_warning`` here is a candidate: ``SeatBook`` sends it once per window."""
    admitted, new, used = result
    if not admitted:
        return Admission(False, limits, used, new=True)
    if not new:
        return Admission(True, limits, used)
    events: list[str] = []
    warning = None
    if used > limits.included:
        events.append("seat_overage")
        warning = (
            f"{limits.kind}: {used} in use, {limits.included} included, "
            f"{limits.allowance} allowed; add seats or upgrade"
        )
    if used >= limits.warn_at:
        events.append("seat_warning")
    return Admission(True, limits, used, new=True, warning=warning, events=tuple(events))


def tier_with_more_seats(matrix: TierMatrix, tier: str, kind: SeatKind, than: int) -> str | None:
    """The cheapest tier above ``tier`` that includes more than ``than`` seats of ``kind``."""
    rank = matrix.tiers[tier].rank
    for candidate in matrix.tiers.values():  # rank order
        if candidate.rank > rank and getattr(candidate.quotas, kind) > than:
            return candidate.name
    return None


def seat_problem(
    admission: Admission, matrix: TierMatrix, role: str | None, upgrade_url: str
) -> tuple[str, dict[str, Any]]:
    """The detail and the extra fields of the 429 ``seat_limit_exceeded`` problem body.
    Owners and admins also get the way to more seats (``required_tier``: the cheapest
    higher tier with more seats, ``addon``: none in the shipped matrix — extra seats are
    bought through billing's ``seats`` action — and the ``upgrade`` link)."""
    limits = admission.limits
    detail = (
        f"{admission.used} {limits.kind} seats in use: {limits.included} included, "
        f"{limits.allowance} allowed with overage"
    )
    fields: dict[str, Any] = {
        "seat": limits.kind,
        "used": admission.used,
        "included": limits.included,
        "allowance": limits.allowance,
        "tier": limits.tier,
    }
    if role in UPSELL_ROLES:
        fields.update(
            required_tier=tier_with_more_seats(matrix, limits.tier, limits.kind, limits.included),
            addon=None,
            upgrade=upgrade_url,
        )
    return detail, fields


def emit_seat_events(
    events: EventLog,
    admission: Admission,
    *,
    tenant: str,
    app: AppName,
    user: str,
    request_id: str,
    revision: str,
) -> None:
    """Queue the admission's ``seat_overage`` / ``seat_warning`` events (never blocks)."""
    limits = admission.limits
    for kind in admission.events:
        events.emit(
            kind,
            tenant=tenant,
            tier=limits.tier,
            app=app,
            seat=limits.kind,
            user=user if kind == "seat_overage" else None,
            used=admission.used,
            included=limits.included,
            allowance=limits.allowance,
            request_id=request_id,
            revision=revision,
        )


class SeatBook:
    """Seat holders this process knows, in front of the store (see the module docstring).

    ``check`` is the hot path: no allocation, no I/O. ``admit`` runs one store call per
    user at a time (concurrent requests of one user share it, in a task held until done);
    everyone else's requests never wait for it."""

    def __init__(
        self,
        store: TenantStore,
        settings: SeatSettings,
        metrics: Metrics | None = None,
        *,
        refresh_seconds: float = HOLDER_REFRESH_SECONDS,
        max_holders: int = MAX_HOLDERS,
        count_seconds: float = COUNT_TTL_SECONDS,
    ) -> None:
        self.store = store
        self.settings = settings
        self.window = settings.window_days * 86400.0
        self.refresh_seconds = min(refresh_seconds, self.window)
        self.max_holders = max_holders
        # kind -> tenant -> user -> until when the holder is known without asking the store
        self._holders: dict[SeatKind, dict[str, dict[str, float]]] = {
            "ops_users": {},
            "drivers": {},
        }
        self._count = 0
        self._refused: dict[str, dict[tuple[SeatKind, str], tuple[Admission, float]]] = {}
        self._extra: dict[str, tuple[Seats | None, float]] = {}
        self._warned: dict[tuple[str, SeatKind], int] = {}  # -> the window already warned
        self._pending: dict[tuple[str, SeatKind, str], asyncio.Task[Admission]] = {}
        self._down_until = 0.0
        self._errors = metrics.store_errors.labels(op="seats") if metrics is not None else None
        self.count_seconds = count_seconds
        # tenant -> (the seats held as last counted, until when that count stands)
        self._counts: dict[str, tuple[HeldSeats, float]] = {}
        self._counting: dict[str, asyncio.Task[HeldSeats]] = {}
        # Counts under way when their tenant changed: their answer is not kept (held here
        # until done, like every task of ours).
        self._superseded: set[asyncio.Task[HeldSeats]] = set()

    # -- the hot path ------------------------------------------------------------------------

    def check(self, tenant: str, kind: SeatKind, user: str, now: float) -> int:
        """``KNOWN`` for a holder confirmed within ``refresh_seconds``, else
        ``NEED_ADMISSION``."""
        users = self._holders[kind].get(tenant)
        if users is not None:
            until = users.get(user)
            if until is not None and until > now:
                return KNOWN
        return NEED_ADMISSION

    # -- admission ---------------------------------------------------------------------------

    async def admit(
        self,
        tenant: str,
        kind: SeatKind,
        user: str,
        *,
        matrix: TierMatrix,
        tier: str,
        seats: Seats | None,
        now: float,
    ) -> Admission:
        """Admit or refuse a user ``check`` did not know. ``tier`` and ``seats`` are the
        decision's (the effective tier and the license's seats claim in force). Never
        raises for a store outage: the user is then allowed (``recorded=False``)."""
        key = (tenant, kind, user)
        pending = self._pending.get(key)
        if pending is not None:  # the same user's concurrent request: events go out once
            return msgspec.structs.replace(await asyncio.shield(pending), events=())
        task = asyncio.get_running_loop().create_task(
            self._admit(tenant, kind, user, matrix, tier, seats, now)
        )
        self._pending[key] = task
        task.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(task)

    async def _admit(
        self,
        tenant: str,
        kind: SeatKind,
        user: str,
        matrix: TierMatrix,
        tier: str,
        seats: Seats | None,
        now: float,
    ) -> Admission:
        refused = self._refused.get(tenant, {}).get((kind, user))
        if refused is not None and refused[1] > now:
            return refused[0]

        def limits(extra: Seats | None) -> SeatLimits:
            return seat_limits(matrix, self.settings, tier, kind, seats, extra)

        if now < self._down_until:
            return self._fail_static(tenant, kind, user, limits(self._known_extra(tenant)), now)
        try:
            wanted = limits(await self._extra_seats(tenant, now))
            result = await self.store.admit_seat(
                tenant, kind, user, now, self.window, wanted.allowance
            )
        except StoreError as exc:
            self._store_failed("seat admission", tenant, exc, now)
            return self._fail_static(tenant, kind, user, limits(self._known_extra(tenant)), now)
        admission = judge(result, wanted)
        if not admission.allowed:
            refusals = self._refused.get(tenant)
            if refusals is None:
                refusals = {}
                bounded_put(self._refused, tenant, refusals, 10_000)
            bounded_put(refusals, (kind, user), (admission, now + REFUSAL_TTL_SECONDS), 1_000)
            return admission
        self._remember(tenant, kind, user, now + self.refresh_seconds)
        if admission.new:
            self._recount(tenant)
        if "seat_warning" in admission.events and not await self._first_warning(tenant, kind, now):
            kept = tuple(event for event in admission.events if event != "seat_warning")
            admission = msgspec.structs.replace(admission, events=kept)
        return admission

    def _store_failed(self, what: str, tenant: str, exc: StoreError, now: float) -> None:
        if self._errors is not None:
            self._errors.inc()
        log.warning("tenant store: %s for %s failed: %s", what, tenant, exc)
        self._down_until = now + OUTAGE_RETRY_SECONDS

    def _fail_static(
        self, tenant: str, kind: SeatKind, user: str, limits: SeatLimits, now: float
    ) -> Admission:
        """Allowed without the store; the user is asked about again after the retry
        interval, and counted at the first request once the store answers."""
        self._remember(tenant, kind, user, now + OUTAGE_RETRY_SECONDS)
        return Admission(True, limits, 0, recorded=False)

    def _known_extra(self, tenant: str) -> Seats | None:
        cached = self._extra.get(tenant)
        return cached[0] if cached is not None else None

    async def _extra_seats(self, tenant: str, now: float) -> Seats | None:
        cached = self._extra.get(tenant)
        if cached is not None and cached[1] > now:
            return cached[0]
        extra = await self.store.extra_seats(tenant)
        bounded_put(self._extra, tenant, (extra, now + EXTRA_SEATS_TTL_SECONDS), 100_000)
        return extra

    async def _first_warning(self, tenant: str, kind: SeatKind, now: float) -> bool:
        """True for the first ``seat_warning`` of this window, across every gateway (the
        store's claim of an event id is atomic)."""
        window = int(now // self.window)
        if self._warned.get((tenant, kind)) == window:
            return False
        try:
            first = await self.store.claim_event(f"seat_warning:{kind}:{window}:{tenant}")
        except StoreError as exc:
            log.warning("tenant store: seat warning for %s not recorded: %s", tenant, exc)
            return False
        bounded_put(self._warned, (tenant, kind), window, 100_000)
        return first

    # -- the seats held, for the entitlements API -----------------------------------------------

    def held(self, tenant: str, now: float) -> HeldSeats | None:
        """The tenant's seats held, counted within ``count_seconds`` (or, while the store is
        known to be down, as last counted); None: ``await count_held`` first."""
        counted = self._counts.get(tenant)
        if counted is not None and counted[1] > now:
            return counted[0]
        if now < self._down_until:
            return self._last_count(tenant)
        return None

    async def count_held(self, tenant: str, now: float) -> HeldSeats:
        """Count the tenant's holders of each kind in the store (concurrent callers share
        one count). Never raises: when the store cannot answer, the last count (fail-static;
        ``used`` None if there was none)."""
        task = self._counting.get(tenant)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._count_held(tenant, now))
            self._counting[tenant] = task
            task.add_done_callback(lambda done: self._count_done(tenant, done))
        return await asyncio.shield(task)

    async def _count_held(self, tenant: str, now: float) -> HeldSeats:
        try:
            extra = await self._extra_seats(tenant, now)
            ops_users = await self.store.seat_holders(tenant, "ops_users", now, self.window)
            drivers = await self.store.seat_holders(tenant, "drivers", now, self.window)
        except StoreError as exc:
            self._store_failed("seat count", tenant, exc, now)
            return self._last_count(tenant)
        held = HeldSeats(Seats(ops_users=len(ops_users), drivers=len(drivers)), extra)
        task = asyncio.current_task()
        if task not in self._superseded:  # else counted before a change: not to be kept
            bounded_put(self._counts, tenant, (held, now + self.count_seconds), MAX_COUNTED)
        return held

    def _count_done(self, tenant: str, task: asyncio.Task[HeldSeats]) -> None:
        self._superseded.discard(task)
        if self._counting.get(tenant) is task:
            del self._counting[tenant]

    def _last_count(self, tenant: str) -> HeldSeats:
        counted = self._counts.get(tenant)
        return counted[0] if counted is not None else HeldSeats(None, self._known_extra(tenant))

    def _recount(self, tenant: str) -> None:
        """The seats held changed: the next ``held`` asks the store again (the last count
        stays, for an outage), and a count under way is not kept."""
        counted = self._counts.get(tenant)
        if counted is not None:
            self._counts[tenant] = (counted[0], 0.0)
        task = self._counting.pop(tenant, None)
        if task is not None:
            self._superseded.add(task)

    # -- the holder cache ----------------------------------------------------------------------

    def _remember(self, tenant: str, kind: SeatKind, user: str, until: float) -> None:
        tenants = self._holders[kind]
        users = tenants.get(tenant)
        if users is None or user not in users:
            if self._count >= self.max_holders:
                self._evict()
                users = tenants.get(tenant)
            if users is None:
                users = tenants[tenant] = {}
            self._count += 1
        users[user] = until

    def _evict(self) -> None:
        """Forget the tenant cached longest ago (its users simply ask the store again)."""
        tenants = max(self._holders.values(), key=len)
        tenant = next(iter(tenants))
        self._count -= len(tenants.pop(tenant))

    def invalidate(self, tenant: str | None = None) -> None:
        """Forget what is cached of ``tenant`` (all tenants: None), e.g. when the store's
        change feed names it after a release or a purchase of extra seats; its seats held
        are counted again (the last count is kept for an outage)."""
        if tenant is None:
            for tenants in self._holders.values():
                tenants.clear()
            self._count = 0
            self._refused.clear()
            self._extra.clear()
            for name in list(self._counts.keys() | self._counting.keys()):
                self._recount(name)
            return
        for tenants in self._holders.values():
            self._count -= len(tenants.pop(tenant, {}))
        self._refused.pop(tenant, None)
        self._extra.pop(tenant, None)
        self._recount(tenant)

    def __len__(self) -> int:
        return self._count
