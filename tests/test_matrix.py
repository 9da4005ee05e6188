"""The tier matrix: the shipped file against docs/design.md §3's product table, look-ups, errors."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError, ConfigProblem
from gateway.matrix import Tier, TierMatrix, build_matrix
from gateway.tomlfile import TomlDocument

REPO = Path(__file__).resolve().parent.parent
SHIPPED = (REPO / "tier_matrix.toml").read_text()

INCLUDED = "included"
ABSENT = "absent"

# docs/design.md §3 "The product matrix", one row per feature: Core, Fleet, Enterprise. A cell is
# INCLUDED, ABSENT (neither the tier nor an add-on for it grants it) or the add-on's name.
PRODUCT_TABLE = [
    pytest.param("ops.on_demand", INCLUDED, INCLUDED, INCLUDED, id="ops-on-demand"),
    pytest.param(
        "ops.route_distribution", "route_distribution", INCLUDED, INCLUDED, id="ops-rd"
    ),
    # "—" for Core in the table, but the Advanced add-on (available to Core) is a superset.
    pytest.param(
        "ops.basic_shipment_optimization", "advanced_shipment_optimization", INCLUDED, INCLUDED,
        id="ops-basic-optimization",
    ),
    pytest.param(
        "ops.advanced_shipment_optimization", "advanced_shipment_optimization",
        "advanced_shipment_optimization", INCLUDED, id="ops-advanced-optimization",
    ),
    pytest.param("ops.sms_messaging", "sms_messaging", INCLUDED, INCLUDED, id="ops-sms"),
    pytest.param("ops.health_data_protection", ABSENT, ABSENT, INCLUDED, id="ops-health-data"),
    pytest.param("portal.on_demand", INCLUDED, INCLUDED, INCLUDED, id="portal-on-demand"),
    pytest.param(
        "portal.route_distribution", "route_distribution", INCLUDED, INCLUDED, id="portal-rd"
    ),
    pytest.param(
        "portal.rd_driver_tracking", "route_distribution", INCLUDED, INCLUDED,
        id="portal-rd-tracking",
    ),
    pytest.param("portal.white_labeling", ABSENT, INCLUDED, INCLUDED, id="portal-white-label"),
    pytest.param("portal.chat_widget", ABSENT, INCLUDED, INCLUDED, id="portal-chat"),
    pytest.param(
        "portal.personalized_url", ABSENT, "personalized_url", INCLUDED, id="portal-url"
    ),
    pytest.param("driver.on_demand", INCLUDED, INCLUDED, INCLUDED, id="driver-on-demand"),
    pytest.param(
        "driver.route_distribution", "route_distribution", INCLUDED, INCLUDED, id="driver-rd"
    ),
    pytest.param("driver.depot_scanning", ABSENT, INCLUDED, INCLUDED, id="driver-depot"),
    pytest.param(
        "driver.bulk_receive_scanning", ABSENT, INCLUDED, INCLUDED, id="driver-bulk-receive"
    ),
    pytest.param("driver.osd_tracking", ABSENT, INCLUDED, INCLUDED, id="driver-osd"),
    pytest.param(
        "ops.emergency_support", ABSENT, "emergency_support", INCLUDED, id="ops-emergency"
    ),
    pytest.param("ops.soc2_end_to_end", ABSENT, "soc2_end_to_end", INCLUDED, id="ops-soc2"),
    pytest.param("ops.multi_region_ha", ABSENT, "multi_region_ha", INCLUDED, id="ops-multi-ha"),
]  # fmt: skip


@pytest.mark.parametrize(("feature", "core", "fleet", "enterprise"), PRODUCT_TABLE)
def test_product_table(
    matrix: TierMatrix, feature: str, core: str, fleet: str, enterprise: str
) -> None:
    for tier, cell in (("core", core), ("fleet", fleet), ("enterprise", enterprise)):
        addon = matrix.addon_unlocking(tier, feature)
        if cell == INCLUDED:
            assert feature in matrix.tiers[tier].features, tier
            assert addon is None, tier
        elif cell == ABSENT:
            assert feature not in matrix.tiers[tier].features, tier
            assert addon is None, tier
        else:
            assert feature not in matrix.tiers[tier].features, tier
            assert addon is not None and addon.name == cell, tier
            assert feature in matrix.entitlement(tier, (cell,)).features, tier


def test_product_table_covers_every_feature(matrix: TierMatrix) -> None:
    rows = {param.values[0] for param in PRODUCT_TABLE}
    assert rows == set(matrix.features)


def test_features_belong_to_their_app(matrix: TierMatrix) -> None:
    prefixes = {"operations": "ops.", "client_portal": "portal.", "driver_app": "driver."}
    for name, feature in matrix.features.items():
        assert name.startswith(prefixes[feature.app]), name
        assert feature.title


@pytest.mark.parametrize(
    ("name", "rank", "title", "price", "quotas", "terms"),
    [
        pytest.param("core", 1, "Core", 600, (1, 1), (4, "none"), id="core"),
        pytest.param("fleet", 2, "Fleet", 1500, (5, 5), (8, "phone"), id="fleet"),
        pytest.param(
            "enterprise", 3, "Enterprise", 4000, (10, 10), ("unlimited", "24/7"), id="enterprise"
        ),
    ],
)
def test_tiers(
    matrix: TierMatrix,
    name: str,
    rank: int,
    title: str,
    price: float,
    quotas: tuple[int, int],
    terms: tuple[int | str, str],
) -> None:
    tier = matrix.tiers[name]
    assert (tier.name, tier.rank, tier.title, tier.price_usd_month) == (name, rank, title, price)
    assert (tier.quotas.ops_users, tier.quotas.drivers) == quotas
    assert (tier.terms.retention_years, tier.terms.support) == terms


def test_tiers_in_rank_order(matrix: TierMatrix) -> None:
    assert list(matrix.tiers) == ["core", "fleet", "enterprise"]
    assert matrix.lowest_tier.name == "core"


def test_enterprise_has_everything(matrix: TierMatrix) -> None:
    assert matrix.tiers["enterprise"].features == frozenset(matrix.features)


@pytest.mark.parametrize(
    ("name", "prices", "features"),
    [
        pytest.param(
            "route_distribution", {"core": "$500/mo"},
            {"ops.route_distribution", "portal.route_distribution",
             "portal.rd_driver_tracking", "driver.route_distribution"},
            id="route-distribution-spans-all-apps",
        ),
        pytest.param(
            "advanced_shipment_optimization",
            {"core": "$2.50/driver/mo", "fleet": "$1.50/driver/mo"},
            {"ops.advanced_shipment_optimization", "ops.basic_shipment_optimization"},
            id="advanced-optimization-grants-basic-too",
        ),
        pytest.param(
            "sms_messaging", {"core": "contact sales"}, {"ops.sms_messaging"}, id="sms"
        ),
        pytest.param(
            "personalized_url", {"fleet": "contact sales"}, {"portal.personalized_url"},
            id="personalized-url",
        ),
        pytest.param(
            "emergency_support", {"fleet": "$300/mo"}, {"ops.emergency_support"}, id="emergency"
        ),
        pytest.param(
            "soc2_end_to_end", {"fleet": "$500/mo"}, {"ops.soc2_end_to_end"}, id="soc2"
        ),
        pytest.param(
            "multi_region_ha", {"fleet": "$1,000/mo"}, {"ops.multi_region_ha"}, id="multi-ha"
        ),
    ],
)  # fmt: skip
def test_addons(matrix: TierMatrix, name: str, prices: dict[str, str], features: set[str]) -> None:
    addon = matrix.addons[name]
    assert addon.prices == prices
    assert set(addon.available_to) == set(prices)
    assert addon.features == frozenset(features)
    assert addon.title


def test_no_other_addons(matrix: TierMatrix) -> None:
    assert len(matrix.addons) == 7
    assert not [a for a in matrix.addons.values() if "enterprise" in a.available_to]


def test_advanced_addon_grants_basic_to_core(matrix: TierMatrix) -> None:
    features = matrix.entitlement("core", ("advanced_shipment_optimization",)).features
    assert "ops.advanced_shipment_optimization" in features
    assert "ops.basic_shipment_optimization" in features


# ---------------------------------------------------------------------------- monotonic tiers


def _by_rank(matrix: TierMatrix) -> list[Tier]:
    return sorted(matrix.tiers.values(), key=lambda tier: tier.rank)


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        pytest.param(a, b, id=f"{a}<{b}")
        for a, b in itertools.combinations(("core", "fleet", "enterprise"), 2)
    ],
)
def test_higher_tier_never_loses_a_feature(matrix: TierMatrix, lower: str, higher: str) -> None:
    low, high = matrix.tiers[lower], matrix.tiers[higher]
    assert low.rank < high.rank
    assert low.features <= high.features
    assert low.features < high.features  # and each step up adds something to sell
    assert high.quotas.ops_users >= low.quotas.ops_users
    assert high.quotas.drivers >= low.quotas.drivers
    assert high.price_usd_month > low.price_usd_month


FEATURE_POOL = tuple(f"ops.f{i}" for i in range(6))


@st.composite
def inheriting_matrices(draw: st.DrawFn) -> tuple[list[list[str]], dict[str, list[str]]]:
    """Tiers t0 < t1 < ... each inheriting the one below, with own features and implies."""
    own = draw(
        st.lists(st.lists(st.sampled_from(FEATURE_POOL), max_size=4), min_size=1, max_size=4)
    )
    used = sorted({f for names in own for f in names})
    implies = {
        f: draw(st.lists(st.sampled_from(used), max_size=2, unique=True)) if used else []
        for f in used
    }
    return own, implies


def _matrix_text(own: Sequence[Sequence[str]], implies: dict[str, list[str]]) -> str:
    def toml_list(names: Sequence[str]) -> str:
        return "[" + ", ".join(f'"{n}"' for n in names) + "]"

    lines: list[str] = []
    for name, implied in implies.items():
        lines += [f'[features."{name}"]', 'app = "operations"', f'title = "{name}"']
        lines += [f"implies = {toml_list(implied)}", ""]
    for index, names in enumerate(own):
        lines += [f"[tiers.t{index}]", f"rank = {index * 10 + 1}", f'title = "T{index}"']
        lines += [f"price_usd_month = {100 * (index + 1)}", f"features = {toml_list(names)}"]
        if index == 0:
            lines += ["quotas = { ops_users = 1, drivers = 1 }"]
            lines += ['terms = { retention_years = 1, support = "none" }']
        else:
            lines += [f'inherits = "t{index - 1}"']
        lines += [""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matrix-property")


@settings(max_examples=150, deadline=None)
@given(inheriting_matrices())
def test_inherited_tiers_never_lose_a_feature(
    scratch: Path, generated: tuple[list[list[str]], dict[str, list[str]]]
) -> None:
    own, implies = generated
    path = scratch / "tier_matrix.toml"
    path.write_text(_matrix_text(own, implies))
    matrix = build_matrix(TomlDocument.read(path))

    def closure(names: set[str]) -> set[str]:
        result: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name not in result:
                result.add(name)
                stack.extend(implies[name])
        return result

    tiers = _by_rank(matrix)
    assert [t.name for t in tiers] == [f"t{i}" for i in range(len(own))]
    for index, tier in enumerate(tiers):
        assert tier.features == closure({f for names in own[: index + 1] for f in names})
        assert tier.quotas == tiers[0].quotas  # inherited from the root
        entitlement = matrix.entitlement(tier.name)
        assert entitlement.features_header == ",".join(sorted(tier.features))
    for lower, higher in itertools.combinations(tiers, 2):
        assert lower.features <= higher.features


# ---------------------------------------------------------------------------- look-ups


@pytest.mark.parametrize(
    ("feature", "tier"),
    [
        pytest.param("ops.on_demand", "core", id="on-demand"),
        pytest.param("driver.on_demand", "core", id="driver-on-demand"),
        pytest.param("ops.route_distribution", "fleet", id="route-distribution"),
        pytest.param("ops.basic_shipment_optimization", "fleet", id="basic-optimization"),
        pytest.param("portal.white_labeling", "fleet", id="white-labeling"),
        pytest.param("ops.advanced_shipment_optimization", "enterprise", id="advanced"),
        pytest.param("ops.health_data_protection", "enterprise", id="health-data"),
        pytest.param("portal.personalized_url", "enterprise", id="personalized-url"),
        pytest.param("ops.multi_region_ha", "enterprise", id="multi-region"),
        pytest.param("ops.no_such_feature", None, id="unknown-feature"),
    ],
)
def test_cheapest_tier_with(matrix: TierMatrix, feature: str, tier: str | None) -> None:
    found = matrix.cheapest_tier_with(feature)
    assert (found.name if found else None) == tier


@pytest.mark.parametrize(
    ("tier", "feature", "addon"),
    [
        pytest.param("core", "ops.route_distribution", "route_distribution", id="core-rd"),
        pytest.param("core", "driver.route_distribution", "route_distribution", id="core-rd-drv"),
        pytest.param(
            "core", "ops.basic_shipment_optimization", "advanced_shipment_optimization",
            id="core-basic-via-advanced",
        ),
        pytest.param(
            "fleet", "ops.advanced_shipment_optimization", "advanced_shipment_optimization",
            id="fleet-advanced",
        ),
        pytest.param("fleet", "ops.basic_shipment_optimization", None, id="fleet-has-basic"),
        pytest.param("fleet", "ops.route_distribution", None, id="fleet-has-rd"),
        pytest.param("core", "ops.emergency_support", None, id="core-no-emergency-addon"),
        pytest.param("fleet", "ops.health_data_protection", None, id="fleet-no-health-addon"),
        pytest.param("enterprise", "ops.sms_messaging", None, id="enterprise-has-all"),
        pytest.param("platinum", "ops.sms_messaging", None, id="unknown-tier"),
        pytest.param("core", "ops.no_such_feature", None, id="unknown-feature"),
    ],
)  # fmt: skip
def test_addon_unlocking(matrix: TierMatrix, tier: str, feature: str, addon: str | None) -> None:
    found = matrix.addon_unlocking(tier, feature)
    assert (found.name if found else None) == addon


CORE = "driver.on_demand,ops.on_demand,portal.on_demand"


@pytest.mark.parametrize(
    ("tier", "addons", "features_header", "addons_header"),
    [
        pytest.param("core", (), CORE, "", id="core"),
        pytest.param(
            "core", ("route_distribution",),
            "driver.on_demand,driver.route_distribution,ops.on_demand,ops.route_distribution,"
            "portal.on_demand,portal.rd_driver_tracking,portal.route_distribution",
            "route_distribution", id="core-route-distribution",
        ),
        pytest.param(
            "core", ("sms_messaging", "advanced_shipment_optimization"),
            "driver.on_demand,ops.advanced_shipment_optimization,"
            "ops.basic_shipment_optimization,ops.on_demand,ops.sms_messaging,portal.on_demand",
            "sms_messaging,advanced_shipment_optimization", id="core-two-addons-in-given-order",
        ),
        pytest.param(
            "fleet", ("emergency_support",),
            "driver.bulk_receive_scanning,driver.depot_scanning,driver.on_demand,"
            "driver.osd_tracking,driver.route_distribution,ops.basic_shipment_optimization,"
            "ops.emergency_support,ops.on_demand,ops.route_distribution,ops.sms_messaging,"
            "portal.chat_widget,portal.on_demand,portal.rd_driver_tracking,"
            "portal.route_distribution,portal.white_labeling",
            "emergency_support", id="fleet-emergency",
        ),
    ],
)  # fmt: skip
def test_entitlement_headers(
    matrix: TierMatrix,
    tier: str,
    addons: tuple[str, ...],
    features_header: str,
    addons_header: str,
) -> None:
    entitlement = matrix.entitlement(tier, addons)
    assert entitlement.tier == tier and entitlement.addons == addons
    assert entitlement.features_header == features_header
    assert entitlement.features == frozenset(features_header.split(","))
    assert entitlement.addons_header == addons_header
    assert matrix.entitlement(tier, addons) == entitlement


def test_entitlement_enterprise_header_lists_every_feature(matrix: TierMatrix) -> None:
    header = matrix.entitlement("enterprise").features_header
    assert header == ",".join(sorted(matrix.features))
    assert " " not in header


def test_entitlement_unknown_addon_grants_nothing(matrix: TierMatrix) -> None:
    assert matrix.entitlement("core", ("no_such_addon",)).features == matrix.tiers["core"].features


def test_entitlement_unknown_tier(matrix: TierMatrix) -> None:
    with pytest.raises(KeyError):
        matrix.entitlement("platinum")


# ---------------------------------------------------------------------------- broken copies

Edit = tuple[str, str]  # (old, new): replace the first occurrence; old "" appends new


def _broken_copy(edits: Sequence[Edit]) -> str:
    text = SHIPPED
    for old, new in edits:
        if old == "":
            text += new
        else:
            assert old in text, old
            text = text.replace(old, new, 1)
    return text


def _line(text: str, header: str) -> int:
    """Line (1-based) of the line that is exactly ``header`` (a table header)."""
    lines = [line.strip() for line in text.splitlines()]
    assert lines.count(header) == 1, header
    return lines.index(header) + 1


CORE_FEATURES = 'features = ["ops.on_demand", "portal.on_demand", "driver.on_demand"]'
CORE_TERMS = 'terms = { retention_years = 4, support = "none" }'


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        pytest.param(
            [(CORE_FEATURES, CORE_FEATURES.replace("[", '["ops.teleport", '))],
            [("tiers.core.features", "[tiers.core]", "unknown feature 'ops.teleport'")],
            id="unknown-feature-in-tier",
        ),
        pytest.param(
            [('features = ["ops.sms_messaging"]', 'features = ["ops.sms"]')],
            [("addons.sms_messaging.features", "[addons.sms_messaging]", "unknown feature")],
            id="unknown-feature-in-addon",
        ),
        pytest.param(
            [('implies = ["ops.basic_shipment_optimization"]', 'implies = ["ops.basic"]')],
            [(
                "features.ops.advanced_shipment_optimization.implies",
                '[features."ops.advanced_shipment_optimization"]', "unknown feature 'ops.basic'",
            )],
            id="unknown-implied-feature",
        ),
        pytest.param(
            [("", '\n[features."ops.teleport"]\napp = "operations"\ntitle = "Teleport"\n')],
            [("features.ops.teleport", '[features."ops.teleport"]', "in no tier and no add-on")],
            id="feature-in-no-tier-and-no-addon",
        ),
        pytest.param(
            [("", '\n[features.teleport]\napp = "operations"\ntitle = "Teleport"\n')],
            [("features.teleport", "[features.teleport]", "in no tier and no add-on")],
            id="undotted-feature-in-no-tier",
        ),
        pytest.param(
            [("rank = 1\n", 'rank = 1\ninherits = "enterprise"\n')],
            [
                ("tiers.core.inherits", "[tiers.core]", "core -> enterprise -> fleet -> core"),
                ("tiers.fleet.inherits", "[tiers.fleet]", "fleet -> core -> enterprise -> fleet"),
                (
                    "tiers.enterprise.inherits", "[tiers.enterprise]",
                    "enterprise -> fleet -> core -> enterprise",
                ),
            ],
            id="inherits-cycle",
        ),
        pytest.param(
            [("rank = 1\n", 'rank = 1\ninherits = "core"\n')],
            [("tiers.core.inherits", "[tiers.core]", "inherits cycle: core -> core")],
            id="inherits-itself",
        ),
        pytest.param(
            [('inherits = "core"', 'inherits = "basic"')],
            [("tiers.fleet.inherits", "[tiers.fleet]", "unknown tier 'basic'")],
            id="unknown-parent",
        ),
        pytest.param(
            [('available_to = ["core"]\nprice = "$500/mo"',
              'available_to = ["core", "fleet"]\nprice = "$500/mo"')],
            [(
                "addons.route_distribution.features", "[addons.route_distribution]",
                "which tier 'fleet' already includes",
            )],
            id="addon-grants-what-tier-has",
        ),
        pytest.param(
            [('available_to = ["fleet"]\nprice = "$300/mo"',
              'available_to = ["fleet", "enterprise"]\nprice = "$300/mo"')],
            [(
                "addons.emergency_support.features", "[addons.emergency_support]",
                "ops.emergency_support, which tier 'enterprise' already includes",
            )],
            id="addon-grants-what-higher-tier-has",
        ),
        pytest.param(
            [('available_to = ["core"]\nprice = "contact sales"',
              'available_to = ["core", "platinum"]\nprice = "contact sales"')],
            [("addons.sms_messaging.available_to", "[addons.sms_messaging]", "'platinum'")],
            id="addon-for-unknown-tier",
        ),
        pytest.param(
            [('fleet = "$1.50/driver/mo" }', 'fleet = "$1.50/driver/mo", enterprise = "$0" }')],
            [(
                "addons.advanced_shipment_optimization.price.enterprise",
                "[addons.advanced_shipment_optimization]", "not available to",
            )],
            id="price-for-unavailable-tier",
        ),
        pytest.param(
            [("", "\n[bundles.starter]\ntitle = 'Starter'\n")],
            [("bundles", "[bundles.starter]", "unknown top-level key")],
            id="unknown-top-level-table",
        ),
        pytest.param(
            [("# The product matrix", "currency = 'USD'\n# The product matrix")],
            [("currency", "currency = 'USD'", "unknown top-level key")],
            id="unknown-top-level-value",
        ),
        pytest.param(
            [('title = "Fleet"', 'title = "Fleet"\ncolour = "blue"')],
            [("tiers.fleet", "[tiers.fleet]", "unknown field `colour`")],
            id="unknown-field-in-tier",
        ),
        pytest.param(
            [('title = "SMS Messaging"\n', 'title = "SMS Messaging"\nicon = "sms.svg"\n')],
            [("features.ops.sms_messaging", '[features."ops.sms_messaging"]', "`icon`")],
            id="unknown-field-in-feature",
        ),
        pytest.param(
            [('title = "Multi-region HA"', 'title = "Multi-region HA"\nsku = "MRHA"')],
            [("addons.multi_region_ha", "[addons.multi_region_ha]", "`sku`")],
            id="unknown-field-in-addon",
        ),
        pytest.param(
            [("quotas = { ops_users = 1, drivers = 1 }",
              "quotas = { ops_users = 1, drivers = 1, admins = 1 }")],
            [("tiers.core.quotas", "[tiers.core]", "`admins`")],
            id="unknown-quota",
        ),
        pytest.param(
            [("rank = 1\n", 'rank = "first"\n')],
            [("tiers.core.rank", "[tiers.core]", "Expected `int`")],
            id="rank-not-a-number",
        ),
        pytest.param(
            [(CORE_TERMS, CORE_TERMS.replace("4", '"forever"'))],
            [("tiers.core.terms.retention_years", "[tiers.core]", "'forever'")],
            id="bad-retention",
        ),
        pytest.param(
            [("quotas = { ops_users = 1, drivers = 1 }\n", "")],
            [("tiers.core.quotas", "[tiers.core]", "no quotas")],
            id="no-quotas",
        ),
        pytest.param(
            [('[features."ops.on_demand"]\napp = "operations"',
              '[features."ops.on_demand"]\napp = "billing"')],
            [("features.ops.on_demand.app", '[features."ops.on_demand"]', "'billing'")],
            id="feature-of-unknown-app",
        ),
        pytest.param(
            [("rank = 3", "rank = 2")],
            [
                ("tiers.enterprise.rank", "[tiers.enterprise]", "also the rank of 'fleet'"),
                ("tiers.enterprise.inherits", "[tiers.enterprise]", "rank is not lower"),
            ],
            id="duplicate-rank",
        ),
        pytest.param(
            [(CORE_FEATURES, CORE_FEATURES.replace("[", '["ops.teleport", ')),
             ('title = "Fleet"', 'title = "Fleet"\ncolour = "blue"'),
             ('implies = ["ops.basic_shipment_optimization"]', 'implies = ["ops.basic"]')],
            [
                (
                    "features.ops.advanced_shipment_optimization.implies",
                    '[features."ops.advanced_shipment_optimization"]', "'ops.basic'",
                ),
                ("tiers.fleet", "[tiers.fleet]", "`colour`"),
                ("tiers.core.features", "[tiers.core]", "'ops.teleport'"),
            ],
            id="every-problem-at-once",
        ),
    ],
)  # fmt: skip
def test_broken_copy(
    tmp_path: Path, edits: list[Edit], expected: list[tuple[str, str, str]]
) -> None:
    text = _broken_copy(edits)
    path = tmp_path / "tier_matrix.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        build_matrix(TomlDocument.read(path))
    problems: Sequence[ConfigProblem] = caught.value.problems
    assert {p.file for p in problems} == {str(path)}
    assert sorted((p.key, p.line) for p in problems) == sorted(
        (key, _line(text, header)) for key, header, _ in expected
    )
    by_key = {p.key: p.message for p in problems}
    for key, _, fragment in expected:
        assert fragment in by_key[key], (key, by_key[key])


def test_shipped_copy_loads(tmp_path: Path) -> None:
    path = tmp_path / "tier_matrix.toml"
    path.write_text(_broken_copy([]))
    assert set(build_matrix(TomlDocument.read(path)).tiers) == {"core", "fleet", "enterprise"}


def test_no_tiers(tmp_path: Path) -> None:
    path = tmp_path / "tier_matrix.toml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as caught:
        build_matrix(TomlDocument.read(path))
    assert [(p.key, p.message) for p in caught.value.problems] == [
        ("tiers", "at least one tier is required")
    ]


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tier_matrix.toml"
    path.write_text(_broken_copy([("[tiers.fleet]", "[tiers.fleet")]))
    with pytest.raises(ConfigError) as caught:
        build_matrix(TomlDocument.read(path))
    (problem,) = caught.value.problems
    assert problem.file == str(path)
    assert problem.line == SHIPPED.splitlines().index("[tiers.fleet]") + 1
    assert "TOML syntax error" in problem.message
