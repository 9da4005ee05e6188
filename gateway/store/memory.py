"""In-process tenant store: for tests, demos and single sidecars seeded from a file.

The reference engine: SQLite and Redis behave exactly like this one (the same tests run
against all three)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from gateway.decision import TenantRecord
from gateway.license import KeyRing, License, Seats
from gateway.store import LocalChanges, StoredKeys, TenantStore


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

    async def is_classic_key(self, key: str) -> bool:
        return key in self._classic

    async def tenants(self) -> list[str]:
        return sorted(self._records)

    async def list_tenants(self) -> list[TenantRecord]:
        return [self._with_licenses(self._records[tenant]) for tenant in sorted(self._records)]

    def changes(self) -> AsyncIterator[str]:
        return self._changes.subscribe()
