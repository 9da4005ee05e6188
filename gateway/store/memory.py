"""In-process tenant store: for tests, demos and single sidecars seeded from a file.

The reference engine: SQLite and Redis behave exactly like this one (the same tests run
against all three)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from gateway.decision import TenantRecord
from gateway.license import KeyRing, License, Seats
from gateway.store import LocalChanges, TenantStore


class MemoryStore(TenantStore):
    def __init__(self, url: str, keyring: KeyRing) -> None:
        self.url = url
        self._keyring = keyring
        self._records: dict[str, TenantRecord] = {}
        self._events: set[str] = set()
        self._classic: dict[str, str] = {}
        self._changes = LocalChanges()

    def _record(self, tenant: str) -> TenantRecord:
        return self._records.get(tenant) or TenantRecord(tenant)

    def _save(self, record: TenantRecord) -> None:
        self._records[record.tenant] = record
        self._changes.publish(record.tenant)

    async def get(self, tenant: str) -> TenantRecord | None:
        return self._records.get(tenant)

    async def put_license(self, token: str) -> License | None:
        lic = self._keyring.verify(token)
        record = self._record(lic.claims.sub)
        if any(held.claims.serial >= lic.claims.serial for held in record.licenses):
            return None
        licenses = sorted((*record.licenses, lic), key=by_serial_desc)
        self._save(msgspec.structs.replace(record, licenses=tuple(licenses)))
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

    async def is_classic_key(self, key: str) -> bool:
        return key in self._classic

    async def tenants(self) -> list[str]:
        return sorted(self._records)

    async def list_tenants(self) -> list[TenantRecord]:
        return [self._records[tenant] for tenant in sorted(self._records)]

    def changes(self) -> AsyncIterator[str]:
        return self._changes.subscribe()


def by_serial_desc(lic: License) -> int:
    """Sort key: newest license (highest serial) first."""
    return -lic.claims.serial
