"""The tier matrix: which features each tier and add-on grants, with prices and quotas.

Loaded from ``tier_matrix.toml`` (docs/design.md §3), validated as a whole, then frozen. Everything
a request needs (a tier's feature set, the header values for the upstream, the cheapest tier
or add-on that unlocks a feature) is computed here once, so the hot path only looks things up.

    matrix = load_matrix(Path("tier_matrix.toml"))
    ent = matrix.entitlement("core", ("route_distribution",))
    "ops.route_distribution" in ent.features  # True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.skus import check_skus
from gateway.tomlfile import TomlDocument

AppName = Literal["operations", "client_portal", "driver_app"]
APP_NAMES: tuple[AppName, ...] = ("operations", "client_portal", "driver_app")


class FeatureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    app: AppName
    title: str
    description: str = ""
    # Features this one includes (Advanced Shipment Optimization includes Basic).
    implies: tuple[str, ...] = ()


class Quotas(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ops_users: int
    drivers: int


class Terms(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    retention_years: int | Literal["unlimited"]
    support: str


class TierSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rank: int
    title: str
    price_usd_month: float
    features: tuple[str, ...] = ()
    inherits: str | None = None
    quotas: Quotas | None = None
    terms: Terms | None = None


class AddonSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: str
    features: tuple[str, ...]
    available_to: tuple[str, ...]
    # One price for every tier, or a price per tier ({core = "...", fleet = "..."}).
    price: str | dict[str, str]


class Tier(msgspec.Struct, frozen=True):
    name: str
    rank: int
    title: str
    price_usd_month: float
    features: frozenset[str]
    quotas: Quotas
    terms: Terms


class Addon(msgspec.Struct, frozen=True):
    name: str
    title: str
    features: frozenset[str]
    available_to: tuple[str, ...]
    prices: dict[str, str]  # tier -> price text


class Entitlement(msgspec.Struct, frozen=True):
    """What one (tier, add-ons) combination grants, with the upstream header values ready."""

    tier: str
    addons: tuple[str, ...]
    features: frozenset[str]
    features_header: str
    addons_header: str
    # The X-Entitlement-Tier/-Features/-Addons lines for the upstream, encoded once.
    upstream_lines: bytes


class TierMatrix:
    """The frozen, validated matrix. Build it with ``load_matrix``."""

    __slots__ = (
        "features",
        "tiers",
        "addons",
        "lowest_tier",
        "sha",
        "_entitlements",
        "_usable",
        "_missing",
        "_cheapest_tier",
        "_unlocking_addon",
    )

    def __init__(
        self,
        features: dict[str, FeatureSpec],
        tiers: dict[str, Tier],
        addons: dict[str, Addon],
        sha: str,
    ) -> None:
        self.features = features
        self.tiers = dict(sorted(tiers.items(), key=lambda item: item[1].rank))
        self.addons = addons
        self.sha = sha
        self.lowest_tier = next(iter(self.tiers.values()))
        self._entitlements: dict[tuple[str, tuple[str, ...]], Entitlement] = {}
        self._usable: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
        self._missing: dict[tuple[str, str], tuple[str, str | None, str | None]] = {}
        self._cheapest_tier: dict[str, Tier] = {}
        for tier in self.tiers.values():  # rank order: the first tier seen is the cheapest
            for feature in tier.features:
                self._cheapest_tier.setdefault(feature, tier)
        self._unlocking_addon: dict[tuple[str, str], Addon] = {}
        for addon in addons.values():
            for tier_name in addon.available_to:
                for feature in addon.features - self.tiers[tier_name].features:
                    self._unlocking_addon.setdefault((tier_name, feature), addon)

    def entitlement(self, tier: str, addons: tuple[str, ...] = ()) -> Entitlement:
        """Features of ``tier`` plus ``addons``. Unknown add-ons grant nothing; an unknown
        tier is a ``KeyError`` (licenses are checked against the matrix before this)."""
        key = (tier, addons)
        found = self._entitlements.get(key)
        if found is not None:
            return found
        features = set(self.tiers[tier].features)
        for name in addons:
            addon = self.addons.get(name)
            if addon is not None:
                features |= addon.features
        features_header = ",".join(sorted(features))
        addons_header = ",".join(addons)
        found = Entitlement(
            tier=tier,
            addons=addons,
            features=frozenset(features),
            features_header=features_header,
            addons_header=addons_header,
            upstream_lines=(
                f"X-Entitlement-Tier: {tier}\r\nX-Entitlement-Features: {features_header}\r\n"
                f"X-Entitlement-Addons: {addons_header}\r\n"
            ).encode(),
        )
        # Licenses are signed, so the combinations are few; the cap only guards memory.
        if len(self._entitlements) < 4096:
            self._entitlements[key] = found
        return found

    def usable_addons(self, tier: str, addons: tuple[str, ...]) -> tuple[str, ...]:
        """The add-ons of a license that grant something: known, and sold to its ``tier``
        (``available_to``). Any other add-on in a signed key grants nothing."""
        key = (tier, addons)
        found = self._usable.get(key)
        if found is None:
            found = tuple(
                name
                for name in addons
                if name in self.addons and tier in self.addons[name].available_to
            )
            if len(self._usable) < 4096:  # signed combinations are few; the cap guards memory
                self._usable[key] = found
        return found

    def cheapest_tier_with(self, feature: str) -> Tier | None:
        """The lowest-rank tier that includes ``feature`` (None: only add-ons grant it)."""
        return self._cheapest_tier.get(feature)

    def addon_unlocking(self, tier: str, feature: str) -> Addon | None:
        """The add-on a ``tier`` customer can buy to get ``feature``, if any."""
        return self._unlocking_addon.get((tier, feature))

    def missing(self, tier: str, feature: str) -> tuple[str, str | None, str | None]:
        """Why ``tier`` lacks ``feature``, as ``decide`` answers it: the detail and the
        names of ``upgrade_path`` (worked out once per pair: every blocked request asks)."""
        key = (tier, feature)
        found = self._missing.get(key)
        if found is None:
            required, addon = self.upgrade_path(tier, feature)
            found = (
                f"{self.features[feature].title} is not in the {self.tiers[tier].title} plan",
                required.name if required else None,
                addon.name if addon else None,
            )
            if len(self._missing) < 4096:  # (tier, feature) pairs: few; the cap guards memory
                self._missing[key] = found
        return found

    def upgrade_path(self, tier: str, feature: str) -> tuple[Tier | None, Addon | None]:
        """What would give a ``tier`` customer ``feature``: the cheapest higher tier that
        includes it (None if no tier above includes it) and the add-on for ``tier``."""
        required = self._cheapest_tier.get(feature)
        if required is not None and required.rank <= self.tiers[tier].rank:
            required = None
        return required, self._unlocking_addon.get((tier, feature))


def load_matrix(path: Path) -> TierMatrix:
    """Read and validate ``tier_matrix.toml``; raise ``ConfigError`` listing every problem."""
    return build_matrix(TomlDocument.read(path))


def build_matrix(doc: TomlDocument) -> TierMatrix:
    data = dict(doc.data)
    for unknown in sorted(set(data) - {"features", "tiers", "addons", "skus"}):
        doc.problem(
            unknown,
            "unknown top-level key (expected features, tiers, addons, skus)",
            line=doc.line_of_key(unknown),
        )

    features = _convert_table(doc, data.get("features", {}), "features", FeatureSpec)
    tier_specs = _convert_table(doc, data.get("tiers", {}), "tiers", TierSpec)
    addon_specs = _convert_table(doc, data.get("addons", {}), "addons", AddonSpec)
    # A section that fails to convert is reported once, at its own key; names that refer to
    # it are not "unknown", and what it would grant is not orphaned.
    declared_features = _declared(data.get("features"))
    declared_tiers = _declared(data.get("tiers"))
    if not tier_specs and not doc.problems:
        doc.problem("tiers", "at least one tier is required")

    for name, feature in features.items():
        for implied in feature.implies:
            if implied not in declared_features:
                doc.problem(
                    f"features.{name}.implies",
                    f"unknown feature {implied!r}",
                    header=_header("features", name),
                )

    def closure(names: tuple[str, ...], key: str, header: str) -> frozenset[str]:
        result: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name in result:
                continue
            spec = features.get(name)
            if spec is None:
                # An unknown name reached through ``implies`` is reported at the feature.
                if name not in declared_features and name in names:
                    doc.problem(key, f"unknown feature {name!r}", header=header)
                continue
            result.add(name)
            stack.extend(spec.implies)
        return frozenset(result)

    tiers = _resolve_tiers(doc, tier_specs, closure, declared_tiers)
    addons: dict[str, Addon] = {}
    for name, spec in addon_specs.items():
        key, header = f"addons.{name}", f"[addons.{name}]"
        granted = closure(spec.features, f"{key}.features", header)
        for tier_name in spec.available_to:
            tier = tiers.get(tier_name)
            if tier is None:
                if tier_name not in declared_tiers:
                    doc.problem(f"{key}.available_to", f"unknown tier {tier_name!r}", header=header)
                continue
            already = sorted(set(spec.features) & tier.features)
            if already:
                doc.problem(
                    f"{key}.features",
                    f"grants {', '.join(already)}, which tier {tier_name!r} already includes",
                    header=header,
                )
        if isinstance(spec.price, dict):
            for tier_name in spec.price:
                if tier_name not in spec.available_to:
                    doc.problem(
                        f"{key}.price.{tier_name}",
                        "price for a tier the add-on is not available to",
                        header=header,
                    )
            prices = dict(spec.price)
        else:
            prices = dict.fromkeys(spec.available_to, spec.price)
        addons[name] = Addon(name, spec.title, granted, spec.available_to, prices)

    granted_anywhere: set[str] = set()
    for tier in tiers.values():
        granted_anywhere |= tier.features
    for addon in addons.values():
        granted_anywhere |= addon.features
    declared_addons = _declared(data.get("addons"))
    everything_loaded = len(tiers) == len(declared_tiers) and len(addons) == len(declared_addons)
    if "skus" in data and everything_loaded:  # what billing sells (gateway.skus)
        check_skus(doc, data["skus"], tiers, addons)
    for name in features:
        if name not in granted_anywhere and tiers and everything_loaded:
            doc.problem(
                f"features.{name}",
                "feature is in no tier and no add-on",
                header=_header("features", name),
            )

    doc.raise_if_problems()
    return TierMatrix(features, tiers, addons, doc.sha)


def _convert_table(doc: TomlDocument, raw: Any, section: str, type_: type[Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        doc.problem(section, "must be a table")
        return {}
    result: dict[str, Any] = {}
    for name, value in raw.items():
        header = _header(section, name)
        spec = doc.convert(value, type_, key=f"{section}.{name}", header=header)
        if spec is not None:
            result[name] = spec
    return result


def _header(section: str, name: str) -> str:
    """The table header that defines ``section.name`` (quoted when the name has a dot)."""
    return f'[{section}."{name}"]' if "." in name else f"[{section}.{name}]"


def _declared(raw: Any) -> set[str]:
    return set(raw) if isinstance(raw, dict) else set()


def _resolve_tiers(
    doc: TomlDocument,
    specs: dict[str, TierSpec],
    closure: Any,
    declared: set[str],
) -> dict[str, Tier]:
    """Flatten ``inherits`` chains (cycles and unknown parents are problems)."""
    ranks: dict[int, str] = {}
    for name, spec in specs.items():
        if spec.rank in ranks:
            doc.problem(
                f"tiers.{name}.rank",
                f"rank {spec.rank} is also the rank of {ranks[spec.rank]!r}",
                header=f"[tiers.{name}]",
            )
        ranks[spec.rank] = name

    tiers: dict[str, Tier] = {}
    for name, spec in specs.items():
        chain = [name]
        current = spec
        broken = False
        while current.inherits is not None:
            parent = current.inherits
            if parent in chain:
                if parent == name:  # a tier that only leads into a cycle is not part of it
                    doc.problem(
                        f"tiers.{name}.inherits",
                        "inherits cycle: " + " -> ".join([*chain, parent]),
                        header=f"[tiers.{name}]",
                    )
                broken = True
                break
            if parent not in specs:
                if parent not in declared:
                    doc.problem(
                        f"tiers.{chain[-1]}.inherits",
                        f"unknown tier {parent!r}",
                        header=f"[tiers.{chain[-1]}]",
                    )
                broken = True
                break
            chain.append(parent)
            current = specs[parent]
        if broken:
            continue
        features: frozenset[str] = frozenset()
        quotas: Quotas | None = None
        terms: Terms | None = None
        for member in reversed(chain):  # root first, so the child's own values win
            member_spec = specs[member]
            features |= closure(
                member_spec.features, f"tiers.{member}.features", f"[tiers.{member}]"
            )
            quotas = member_spec.quotas or quotas
            terms = member_spec.terms or terms
        if spec.inherits is not None and specs[spec.inherits].rank >= spec.rank:
            doc.problem(
                f"tiers.{name}.inherits",
                f"inherits from {spec.inherits!r}, whose rank is not lower",
                header=f"[tiers.{name}]",
            )
        if quotas is None or terms is None:
            missing = "quotas" if quotas is None else "terms"
            doc.problem(
                f"tiers.{name}.{missing}",
                f"no {missing} (set them here or on a tier it inherits)",
                header=f"[tiers.{name}]",
            )
            continue
        tiers[name] = Tier(
            name, spec.rank, spec.title, spec.price_usd_month, features, quotas, terms
        )
    return tiers
