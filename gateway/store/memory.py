"""In-process tenant store: for tests, demos and single sidecars seeded from a file."""

from __future__ import annotations

import msgspec

from gateway.decision import TenantRecord
from gateway.license import KeyRing, License
from gateway.store import TenantStore


class MemoryStore(TenantStore):
    def __init__(self, url: str, keyring: KeyRing) -> None:
        self.url = url
        self._keyring = keyring
        self._records: dict[str, TenantRecord] = {}

    def _record(self, tenant: str) -> TenantRecord:
        return self._records.get(tenant) or TenantRecord(tenant)

    async def get(self, tenant: str) -> TenantRecord | None:
        return self._records.get(tenant)

    async def put_license(self, token: str) -> bool:
        lic = self._keyring.verify(token)
        record = self._record(lic.claims.sub)
        if any(held.claims.serial >= lic.claims.serial for held in record.licenses):
            return False
        licenses = sorted((*record.licenses, lic), key=_by_serial_desc)
        self._records[record.tenant] = _replace(record, licenses=tuple(licenses))
        return True

    async def set_suspended(self, tenant: str, suspended: bool) -> None:
        self._records[tenant] = _replace(self._record(tenant), suspended=suspended)

    async def revoke(self, tenant: str, license_id: str) -> None:
        record = self._record(tenant)
        self._records[tenant] = _replace(record, revoked=record.revoked | {license_id})


def _by_serial_desc(lic: License) -> int:
    return -lic.claims.serial


def _replace(record: TenantRecord, **changes: object) -> TenantRecord:
    return msgspec.structs.replace(record, **changes)
