"""In-process tenant store: for tests, demos and single sidecars seeded from a file.

The reference engine: SQLite and Redis behave exactly like this one (the same tests run
against all three)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import msgspec

from gateway.decision import TenantRecord
from gateway.license import KeyRing, License, Seats
from gateway.store import (
    LocalChanges,
    SeatAdmission,
    SeatHolder,
    SeatKind,
    StoredKeys,
    TenantStore,
    UsageCount,
    by_last_seen,
)


class MemoryStore(TenantStore):
    def __init__(self, url: str, keyring: KeyRing) -> None:
        self.url = url
        self.keys = StoredKeys(keyring, "memory")
        # Records without their licenses; the raw keys beside them, newest serial first,
        # verified on read like the other engines' (so a swapped key ring counts here too).
        self._records: dict[str, TenantRecord] = {}
        self._tokens: dict[str, list[tuple[int, str]]] = {}
        self._events: set[str] = set()
        self._classic: dict[str, str] = {}
        self._changes = LocalChanges()
        self._seats: dict[tuple[str, SeatKind], dict[str, float]] = {}  # user -> last seen
        self._extra: dict[str, Seats] = {}
        self._usage: dict[tuple[str, int, str, str], int] = {}

    def _record(self, tenant: str) -> TenantRecord:
        return self._records.get(tenant) or TenantRecord(tenant)

    def _save(self, record: TenantRecord) -> None:
        self._records[record.tenant] = record
        self._changes.publish(record.tenant)

    async def get(self, tenant: str) -> TenantRecord | None:
        record = self._records.get(tenant)
        return None if record is None else self._with_licenses(record)

    def _with_licenses(self, record: TenantRecord) -> TenantRecord:
        tokens = [token for _, token in self._tokens.get(record.tenant, ())]
        return msgspec.structs.replace(record, licenses=self.keys.licenses(record.tenant, tokens))

    async def put_license(self, token: str) -> License | None:
        lic = self.keys.verify(token)
        tenant, serial = lic.claims.sub, lic.claims.serial
        held = self._tokens.setdefault(tenant, [])
        if held and held[0][0] >= serial:
            return None
        held.insert(0, (serial, token))
        self._save(self._record(tenant))
        return lic

    async def set_suspended(self, tenant: str, suspended: bool) -> bool:
        record = self._record(tenant)
        if record.suspended == suspended and tenant in self._records:
            return False
        self._save(msgspec.structs.replace(record, suspended=suspended))
        return True

    async def revoke(self, tenant: str, license_id: str) -> bool:
        record = self._record(tenant)
        if license_id in record.revoked:
            return False
        self._save(msgspec.structs.replace(record, revoked=record.revoked | {license_id}))
        return True

    async def set_usage(self, tenant: str, ops_users: int, drivers: int) -> None:
        record = self._record(tenant)
        self._save(msgspec.structs.replace(record, usage=Seats(ops_users, drivers)))

    async def claim_event(self, event_id: str) -> bool:
        if event_id in self._events:
            return False
        self._events.add(event_id)
        return True

    async def release_event(self, event_id: str) -> None:
        self._events.discard(event_id)

    async def import_classic_key(self, tenant: str, key: str) -> None:
        self._classic[key] = tenant

    async def remove_classic_key(self, key: str) -> bool:
        return self._classic.pop(key, None) is not None

    async def is_classic_key(self, key: str) -> bool:
        return key in self._classic

    async def tenants(self) -> list[str]:
        return sorted(self._records)

    async def list_tenants(self) -> list[TenantRecord]:
        return [self._with_licenses(self._records[tenant]) for tenant in sorted(self._records)]

    def changes(self) -> AsyncIterator[str]:
        return self._changes.subscribe()

    # -- seats and usage (no await inside: each call is atomic on the event loop) -------------

    def _holders(self, tenant: str, kind: SeatKind, now: float, window: float) -> dict[str, float]:
        holders = self._seats.setdefault((tenant, kind), {})
        cutoff = now - window
        for user in [user for user, seen in holders.items() if seen <= cutoff]:
            del holders[user]
        return holders

    async def admit_seat(
        self, tenant: str, kind: SeatKind, user: str, now: float, window: float, hard_limit: int
    ) -> SeatAdmission:
        holders = self._holders(tenant, kind, now, window)
        seen = holders.get(user)
        if seen is not None:
            holders[user] = max(seen, now)
            return SeatAdmission(True, False, len(holders))
        if len(holders) >= hard_limit:
            return SeatAdmission(False, True, len(holders))
        holders[user] = now
        return SeatAdmission(True, True, len(holders))

    async def seat_holders(
        self, tenant: str, kind: SeatKind, now: float, window: float
    ) -> list[SeatHolder]:
        holders = self._holders(tenant, kind, now, window)
        return by_last_seen([SeatHolder(user, seen) for user, seen in holders.items()])

    async def release_seat(self, tenant: str, kind: SeatKind, user: str) -> bool:
        held = self._seats.get((tenant, kind), {}).pop(user, None) is not None
        if held:
            self._changes.publish(tenant)
        return held

    async def set_extra_seats(self, tenant: str, ops_users: int, drivers: int) -> None:
        self._extra[tenant] = Seats(ops_users, drivers)
        self._changes.publish(tenant)

    async def extra_seats(self, tenant: str) -> Seats | None:
        return self._extra.get(tenant)

    async def add_usage(self, batch: Sequence[UsageCount]) -> None:
        for count in batch:
            key = (count.tenant, count.minute, count.feature, count.client)
            self._usage[key] = self._usage.get(key, 0) + count.calls

    async def usage(
        self, tenant: str, since: float, until: float | None = None
    ) -> list[UsageCount]:
        end = float("inf") if until is None else until
        return sorted(
            UsageCount(owner, minute, feature, client, calls)
            for (owner, minute, feature, client), calls in self._usage.items()
            if owner == tenant and since <= minute < end
        )
