"""Linking the funnel: which recent blocks and clicks an upgrade answers (README, Entitlements
API and plan page, "The funnel, linked").

The enforcer notes each ``feature_block`` (tenant, feature) and each ``upgrade_click``
(tenant, target) as it answers them; when the provisioning hook applies a license that
raises the plan, ``upgrade_complete`` carries ``attributed_clicks`` (clicks in the window
whose target was bought: the new tier or one below it but above the old one, or an add-on
just added) and ``attributed_blocks`` (blocks in the window on features the new plan now
includes). Kept in memory per process, in day buckets, bounded: with several processes the
hook's process counts what it saw itself; ``gateway report funnel`` counts across all
events files.

    attribution = Attribution(window_days=14)
    attribution.block("acme", "ops.route_distribution", time.time())
    attribution.click("acme", "tier:fleet", time.time())
    clicks, blocks = attribution.attribute("acme", targets, unlocked, time.time())
"""

from __future__ import annotations

from collections.abc import Collection

from gateway.caches import bounded_put

DAY = 86400
MAX_TENANTS = 100_000  # tenants remembered (the oldest noted go first)
MAX_KEYS_PER_TENANT = 1024  # (feature or target, day) pairs per tenant


class Attribution:
    """Recent blocks and clicks per tenant, counted per (feature or target, day)."""

    __slots__ = ("window", "_blocks", "_clicks")

    def __init__(self, window_days: int = 14) -> None:
        self.window = window_days * DAY
        self._blocks: dict[str, dict[tuple[str, int], int]] = {}
        self._clicks: dict[str, dict[tuple[str, int], int]] = {}

    def block(self, tenant: str, feature: str, now: float) -> None:
        _note(self._blocks, tenant, feature, now)

    def click(self, tenant: str, target: str, now: float) -> None:
        _note(self._clicks, tenant, target, now)

    def attribute(
        self, tenant: str, targets: Collection[str], features: Collection[str], now: float
    ) -> tuple[int, int]:
        """Clicks on ``targets`` (``tier:<name>`` / ``addon:<name>``) and blocks on
        ``features`` of ``tenant`` within the window before ``now``."""
        since = int((now - self.window) // DAY)
        return (
            _count(self._clicks.get(tenant), targets, since),
            _count(self._blocks.get(tenant), features, since),
        )


def _note(table: dict[str, dict[tuple[str, int], int]], tenant: str, what: str, now: float) -> None:
    days = table.get(tenant)
    if days is None:
        days = {}
        bounded_put(table, tenant, days, MAX_TENANTS)
    key = (what, int(now // DAY))
    count = days.get(key)
    if count is not None:
        days[key] = count + 1
    else:
        bounded_put(days, key, 1, MAX_KEYS_PER_TENANT)


def _count(days: dict[tuple[str, int], int] | None, names: Collection[str], since: int) -> int:
    if not days:
        return 0
    return sum(n for (name, day), n in days.items() if day >= since and name in names)
