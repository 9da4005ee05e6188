"""SKUs: what billing sells, mapped to a tier, add-ons and extra seats.

The ``[skus]`` table lives in ``tier_matrix.toml`` beside the tiers and add-ons it names,
so ``gateway check`` (and every reload) validates it with the matrix. An order is a list
of SKUs; ``resolve`` turns it into one ``Plan`` or refuses it with the SKU and the rule it
breaks (``OrderRefused``), the same way for the issuing service and ``license issue --sku``.

    [skus.FLEET-M]
    tier = "fleet"
    [skus.RD]
    addons = ["route_distribution"]
    [skus.DRIVERS-5]
    seats = { drivers = 5 }             # on top of the tier's included seats

    catalog = catalog_of(doc)           # after build_matrix(doc) accepted the file
    plan = resolve(catalog, matrix, [SkuLine("FLEET-M")])
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.license import Seats

if TYPE_CHECKING:
    from gateway.matrix import Addon, Tier, TierMatrix
    from gateway.tomlfile import TomlDocument

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # TOML keys that need no quotes
_SKU_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ExtraSeats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ops_users: int = 0
    drivers: int = 0


class SkuSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: str = ""
    tier: str | None = None
    addons: tuple[str, ...] = ()
    seats: ExtraSeats | None = None  # added to the tier's included seats, per unit
    days: int | None = None  # term of the license when the order gives no ends_at


class SkuLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of an order: a SKU and how many (seat packs are bought by the unit)."""

    sku: str
    quantity: int = 1


class Plan(msgspec.Struct, frozen=True):
    """What an order grants: the license's tier, add-ons and seats (None: the tier's)."""

    tier: str
    addons: tuple[str, ...]
    seats: Seats | None
    days: int | None


class OrderRefused(Exception):
    """The matrix does not allow the order: which SKU, which rule, and why."""

    def __init__(self, rule: str, sku: str | None, detail: str) -> None:
        self.rule = rule
        self.sku = sku
        self.detail = detail
        super().__init__(f"{rule}: {detail}")


SkuCatalog = dict[str, SkuSpec]


def _header(name: str) -> str:
    return f"[skus.{name}]" if _BARE_KEY.match(name) else f'[skus."{name}"]'


def check_skus(
    doc: TomlDocument, raw: Any, tiers: dict[str, Tier], addons: dict[str, Addon]
) -> None:
    """Record every problem of the ``[skus]`` table in ``doc`` (called by ``build_matrix``)."""
    if not isinstance(raw, dict):
        doc.problem("skus", "must be a table of SKUs", line=doc.line_of_key("skus"))
        return
    for name, value in raw.items():
        key, header = f"skus.{name}", _header(name)
        if not _SKU_NAME.match(name):
            doc.problem(key, "bad SKU: letters, digits, '.', '_', '-' (max 64)", header=header)
        spec = doc.convert(value, SkuSpec, key=key, header=header)
        if spec is None:
            continue
        if spec.tier is None and not spec.addons and spec.seats is None:
            doc.problem(key, "grants nothing: give a tier, add-ons or seats", header=header)
        if spec.seats is not None and min(spec.seats.ops_users, spec.seats.drivers) < 0:
            doc.problem(f"{key}.seats", "must not be negative", header=header)
        if spec.days is not None and spec.days <= 0:
            doc.problem(f"{key}.days", "must be positive", header=header)
        if spec.tier is not None and spec.tier not in tiers:
            doc.problem(f"{key}.tier", f"unknown tier {spec.tier!r}", header=header)
        for addon in spec.addons:
            if addon not in addons:
                doc.problem(f"{key}.addons", f"unknown add-on {addon!r}", header=header)
            elif spec.tier is not None and spec.tier in tiers:
                refused = addon_rule(tiers[spec.tier], addons[addon])
                if refused is not None:
                    doc.problem(f"{key}.addons", refused[1], header=header)


def catalog_of(doc: TomlDocument) -> SkuCatalog:
    """The SKUs of a matrix document ``build_matrix`` accepted (so they convert)."""
    raw = doc.data.get("skus", {})
    return {name: msgspec.convert(value, SkuSpec) for name, value in raw.items()}


def addon_rule(tier: Tier, addon: Addon) -> tuple[str, str] | None:
    """The rule an add-on breaks for a tier, as (rule, explanation), or None."""
    if addon.features <= tier.features:
        return (
            "addon_included_in_tier",
            f"add-on {addon.name!r} is not available to tier {tier.name!r}: the tier already "
            "includes everything it grants",
        )
    if tier.name not in addon.available_to:
        sold_to = ", ".join(addon.available_to)
        return (
            "addon_not_available",
            f"add-on {addon.name!r} is not available to tier {tier.name!r} (only {sold_to})",
        )
    return None


def resolve(catalog: SkuCatalog, matrix: TierMatrix, lines: list[SkuLine]) -> Plan:
    """One plan for an order's SKUs, or ``OrderRefused`` naming the first SKU at fault."""
    if not lines:
        raise OrderRefused("no_tier", None, "the order has no SKUs")
    tier_sku: tuple[str, str] | None = None  # (sku, tier)
    specs: list[tuple[SkuLine, SkuSpec]] = []
    for line in lines:
        spec = catalog.get(line.sku)
        if spec is None:
            raise OrderRefused("unknown_sku", line.sku, f"no SKU {line.sku!r} in the catalog")
        if line.quantity < 1:
            raise OrderRefused("bad_quantity", line.sku, "quantity must be at least 1")
        if spec.tier is not None:
            if spec.tier not in matrix.tiers:
                raise OrderRefused("unknown_tier", line.sku, f"unknown tier {spec.tier!r}")
            if tier_sku is not None:
                raise OrderRefused(
                    "several_tiers",
                    line.sku,
                    f"{line.sku!r} is tier {spec.tier!r}, {tier_sku[0]!r} already gives "
                    f"tier {tier_sku[1]!r}: one tier per license",
                )
            tier_sku = (line.sku, spec.tier)
        specs.append((line, spec))
    if tier_sku is None:
        raise OrderRefused("no_tier", lines[0].sku, "no SKU of the order names a tier")
    tier = matrix.tiers[tier_sku[1]]
    addons: list[str] = []
    extra_ops = extra_drivers = 0
    days: int | None = None
    for line, spec in specs:
        for name in spec.addons:
            addon = matrix.addons.get(name)
            if addon is None:
                raise OrderRefused("unknown_addon", line.sku, f"unknown add-on {name!r}")
            refused = addon_rule(tier, addon)
            if refused is not None:
                raise OrderRefused(refused[0], line.sku, refused[1])
            if name not in addons:
                addons.append(name)
        if spec.seats is not None:
            extra_ops += spec.seats.ops_users * line.quantity
            extra_drivers += spec.seats.drivers * line.quantity
        if spec.tier is not None:
            days = spec.days
    seats = None
    if extra_ops or extra_drivers:
        seats = Seats(tier.quotas.ops_users + extra_ops, tier.quotas.drivers + extra_drivers)
    return Plan(tier.name, tuple(sorted(addons)), seats, days)


def check_plan(matrix: TierMatrix, tier: str, addons: tuple[str, ...]) -> None:
    """The same rules for a tier and add-ons given by name (``license issue --tier``, the
    lines of ``gateway migrate``'s plan file)."""
    if tier not in matrix.tiers:
        known = ", ".join(matrix.tiers)
        raise OrderRefused("unknown_tier", None, f"unknown tier {tier!r} (known: {known})")
    for name in addons:
        addon = matrix.addons.get(name)
        if addon is None:
            known = ", ".join(matrix.addons)
            raise OrderRefused("unknown_addon", None, f"unknown add-on {name!r} (known: {known})")
        refused = addon_rule(matrix.tiers[tier], addon)
        if refused is not None:
            raise OrderRefused(refused[0], None, refused[1])
    if len(set(addons)) != len(addons):
        raise OrderRefused("addon_repeated", None, "an add-on is listed twice")


def check_grandfather(matrix: TierMatrix, tier: str, grandfather_tier: str) -> None:
    """A grandfather window's tier must be known and rank above the license's tier (the
    gateways ignore one that does not, so signing it would be a mistake)."""
    window = matrix.tiers.get(grandfather_tier)
    if window is None:
        known = ", ".join(matrix.tiers)
        raise OrderRefused(
            "unknown_grandfather_tier",
            None,
            f"unknown grandfather tier {grandfather_tier!r} (known: {known})",
        )
    if window.rank <= matrix.tiers[tier].rank:
        raise OrderRefused(
            "grandfather_not_above_tier",
            None,
            f"grandfather tier {grandfather_tier!r} does not rank above tier {tier!r}: "
            "the window would grant nothing",
        )


def skus_for(
    catalog: SkuCatalog, matrix: TierMatrix, tier: str, addons: tuple[str, ...]
) -> list[SkuLine]:
    """SKUs whose order is exactly ``tier`` + ``addons`` (no seat packs: an order's
    ``seats`` say those), or ``OrderRefused`` (rule ``no_sku``) naming what no SKU sells.
    Only SKUs that grant nothing beyond the plan qualify; the first tier SKU by name, then
    add-on SKUs covering the most of what is still missing, so the choice is stable."""
    wanted = set(addons)
    fits = {
        name: spec
        for name, spec in sorted(catalog.items())
        if spec.seats is None and spec.tier in (None, tier) and set(spec.addons) <= wanted
    }
    tier_skus = [name for name, spec in fits.items() if spec.tier == tier]
    if not tier_skus:
        raise OrderRefused("no_sku", None, f"no SKU sells tier {tier!r} on its own")
    chosen = [tier_skus[0]]
    missing = wanted - set(fits[chosen[0]].addons)
    while missing:
        best = max(
            (name for name, spec in fits.items() if spec.tier is None),
            key=lambda name: len(missing & set(fits[name].addons)),
            default=None,
        )
        if best is None or not missing & set(fits[best].addons):
            names = ", ".join(repr(name) for name in sorted(missing))
            raise OrderRefused(
                "no_sku", None, f"no SKU sells add-on {names} (alone, or bundled within the plan)"
            )
        chosen.append(best)
        missing -= set(fits[best].addons)
    lines = [SkuLine(name) for name in chosen]
    plan = resolve(catalog, matrix, lines)  # the matrix's rules, as the issuer applies them
    assert (plan.tier, set(plan.addons), plan.seats) == (tier, wanted, None), plan
    return lines
