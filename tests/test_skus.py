"""SKUs: the ``[skus]`` table of tier_matrix.toml and how an order's SKUs become a plan."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.license import Seats
from gateway.matrix import TierMatrix, build_matrix
from gateway.skus import (
    OrderRefused,
    Plan,
    SkuCatalog,
    SkuLine,
    catalog_of,
    check_grandfather,
    check_plan,
    resolve,
    skus_for,
)
from gateway.tomlfile import TomlDocument

REPO = Path(__file__).resolve().parent.parent
SHIPPED = (REPO / "tier_matrix.toml").read_text()


@pytest.fixture(scope="module")
def shipped() -> tuple[TierMatrix, SkuCatalog]:
    doc = TomlDocument.read(REPO / "tier_matrix.toml")
    return build_matrix(doc), catalog_of(doc)


def lines(*skus: str) -> list[SkuLine]:
    result = []
    for sku in skus:
        name, _, quantity = sku.partition(":")
        result.append(SkuLine(name, int(quantity or 1)))
    return result


@pytest.mark.parametrize(
    ("skus", "plan"),
    [
        pytest.param(["CORE"], Plan("core", (), None, None), id="tier-only"),
        pytest.param(
            ["ADDON-SMS", "CORE", "ADDON-ROUTE-DIST"],
            Plan("core", ("route_distribution", "sms_messaging"), None, None),
            id="addons-any-order",
        ),
        pytest.param(
            ["FLEET", "SEAT-DRIVER:5", "SEAT-OPS", "SEAT-OPS"],
            Plan("fleet", (), Seats(5 + 2, 5 + 5), None),
            id="seat-packs-add-to-the-tier",
        ),
        pytest.param(
            ["FLEET", "ADDON-PURL", "ADDON-PURL"], Plan("fleet", ("personalized_url",), None, None),
            id="same-addon-twice-once",
        ),
    ],
)  # fmt: skip
def test_resolve(shipped: tuple[TierMatrix, SkuCatalog], skus: list[str], plan: Plan) -> None:
    matrix, catalog = shipped
    assert resolve(catalog, matrix, lines(*skus)) == plan


@pytest.mark.parametrize(
    ("skus", "rule", "sku"),
    [
        pytest.param(["PLATINUM"], "unknown_sku", "PLATINUM", id="unknown-sku"),
        pytest.param(["ADDON-SMS"], "no_tier", "ADDON-SMS", id="no-tier"),
        pytest.param([], "no_tier", None, id="empty"),
        pytest.param(["CORE", "FLEET"], "several_tiers", "FLEET", id="two-tiers"),
        pytest.param(["CORE", "ADDON-PURL"], "addon_not_available", "ADDON-PURL",
                     id="addon-not-for-core"),
        pytest.param(["FLEET", "ADDON-ROUTE-DIST"], "addon_included_in_tier", "ADDON-ROUTE-DIST",
                     id="fleet-has-route-distribution"),
        pytest.param(["ENTERPRISE", "ADDON-EMERGENCY"], "addon_included_in_tier",
                     "ADDON-EMERGENCY", id="enterprise-has-everything"),
        pytest.param(["CORE", "SEAT-OPS:0"], "bad_quantity", "SEAT-OPS", id="zero-quantity"),
    ],
)  # fmt: skip
def test_resolve_refuses(
    shipped: tuple[TierMatrix, SkuCatalog], skus: list[str], rule: str, sku: str | None
) -> None:
    matrix, catalog = shipped
    with pytest.raises(OrderRefused) as refused:
        resolve(catalog, matrix, lines(*skus))
    assert (refused.value.rule, refused.value.sku) == (rule, sku)


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        pytest.param('[skus.GOLD]\ntier = "gold"\n', "skus.GOLD.tier", "unknown tier 'gold'",
                     id="unknown-tier"),
        pytest.param('[skus.JET]\naddons = ["jetpack"]\n', "skus.JET.addons",
                     "unknown add-on 'jetpack'", id="unknown-addon"),
        pytest.param('[skus.CORE-PURL]\ntier = "core"\naddons = ["personalized_url"]\n',
                     "skus.CORE-PURL.addons", "not available to tier 'core'",
                     id="addon-not-for-the-tier"),
        pytest.param('[skus.NOTHING]\ntitle = "Nothing"\n', "skus.NOTHING", "grants nothing",
                     id="grants-nothing"),
        pytest.param('[skus.X]\ntier = "core"\ncolour = "red"\n', "skus.X", "`colour`",
                     id="unknown-field"),
        pytest.param('[skus.MINUS]\nseats = { drivers = -1 }\n', "skus.MINUS.seats",
                     "negative", id="negative-seats"),
        pytest.param('[skus."A B"]\ntier = "core"\n', "skus.A B", "bad SKU", id="bad-name"),
    ],
)  # fmt: skip
def test_matrix_checks_the_skus(tmp_path: Path, table: str, key: str, fragment: str) -> None:
    path = tmp_path / "tier_matrix.toml"
    path.write_text(SHIPPED + "\n" + table)
    with pytest.raises(ConfigError) as caught:
        build_matrix(TomlDocument.read(path))
    (problem,) = caught.value.problems
    assert problem.key == key and fragment in problem.message
    assert problem.line is not None and path.read_text().splitlines()[problem.line - 1].startswith(
        "[skus."
    )


def test_gateway_check_refuses_a_bad_sku(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    matrix = config_dir / "tier_matrix.toml"
    matrix.write_text(matrix.read_text() + '\n[skus.GOLD]\ntier = "gold"\n')
    assert main(["check", "--config", str(config_dir / "gateway.toml")]) == 1
    assert "[skus.GOLD.tier]: unknown tier 'gold'" in capsys.readouterr().err


def test_every_shipped_tier_and_addon_is_sold(shipped: tuple[TierMatrix, SkuCatalog]) -> None:
    matrix, catalog = shipped
    assert {spec.tier for spec in catalog.values()} - {None} == set(matrix.tiers)
    assert {addon for spec in catalog.values() for addon in spec.addons} == set(matrix.addons)


# -- the same rules for plans given by name, and the way back from a plan to SKUs ---------------


@pytest.mark.parametrize(
    ("tier", "addons", "rule"),
    [
        pytest.param("gold", (), "unknown_tier", id="unknown-tier"),
        pytest.param("core", ("jetpack",), "unknown_addon", id="unknown-addon"),
        pytest.param("core", ("personalized_url",), "addon_not_available", id="not-sold-to-core"),
        pytest.param("fleet", ("route_distribution",), "addon_included_in_tier",
                     id="fleet-has-it"),
        pytest.param("core", ("sms_messaging", "sms_messaging"), "addon_repeated", id="twice"),
    ],
)  # fmt: skip
def test_check_plan_refuses(
    shipped: tuple[TierMatrix, SkuCatalog], tier: str, addons: tuple[str, ...], rule: str
) -> None:
    with pytest.raises(OrderRefused) as refused:
        check_plan(shipped[0], tier, addons)
    assert refused.value.rule == rule


@pytest.mark.parametrize(
    ("tier", "window", "rule"),
    [
        pytest.param("core", "enterprise", None, id="above"),
        pytest.param("enterprise", "enterprise", "grandfather_not_above_tier", id="same"),
        pytest.param("fleet", "core", "grandfather_not_above_tier", id="below"),
        pytest.param("core", "gold", "unknown_grandfather_tier", id="unknown"),
    ],
)
def test_check_grandfather(
    shipped: tuple[TierMatrix, SkuCatalog], tier: str, window: str, rule: str | None
) -> None:
    if rule is None:
        check_grandfather(shipped[0], tier, window)
        return
    with pytest.raises(OrderRefused) as refused:
        check_grandfather(shipped[0], tier, window)
    assert refused.value.rule == rule


def test_every_plan_the_matrix_sells_has_skus(shipped: tuple[TierMatrix, SkuCatalog]) -> None:
    """Brute force over the shipped matrix: every tier with every set of add-ons sold to it
    maps to SKUs, and those SKUs resolve to exactly that plan."""
    matrix, catalog = shipped
    for tier in matrix.tiers:
        sold = [name for name in matrix.addons if _sold(matrix, tier, name)]
        for size in range(len(sold) + 1):
            for addons in itertools.combinations(sold, size):
                found = skus_for(catalog, matrix, tier, addons)
                assert resolve(catalog, matrix, found) == Plan(
                    tier, tuple(sorted(addons)), None, catalog[found[0].sku].days
                )


def _sold(matrix: TierMatrix, tier: str, addon: str) -> bool:
    try:
        check_plan(matrix, tier, (addon,))
    except OrderRefused:
        return False
    return True


BUNDLE = (
    '[skus.CORE-ROUTE]\ntier = "core"\naddons = ["route_distribution"]\n'
    '[skus.BUNDLE]\naddons = ["sms_messaging", "route_distribution"]\n'
)


@pytest.mark.parametrize(
    ("extra", "tier", "addons", "skus"),
    [
        pytest.param("", "core", ("sms_messaging", "route_distribution"),
                     ["CORE", "ADDON-ROUTE-DIST", "ADDON-SMS"], id="one-sku-per-addon"),
        pytest.param(BUNDLE, "core", ("sms_messaging", "route_distribution"),
                     ["CORE", "BUNDLE"], id="a-bundle-that-fits"),
        pytest.param(BUNDLE, "core", ("route_distribution",), ["CORE", "ADDON-ROUTE-DIST"],
                     id="a-bundle-granting-more-is-not-used"),
    ],
)  # fmt: skip
def test_skus_for(
    tmp_path: Path, extra: str, tier: str, addons: tuple[str, ...], skus: list[str]
) -> None:
    path = tmp_path / "tier_matrix.toml"
    path.write_text(SHIPPED + "\n" + extra)
    doc = TomlDocument.read(path)
    assert [line.sku for line in skus_for(catalog_of(doc), build_matrix(doc), tier, addons)] == skus


def test_a_plan_no_sku_sells_is_refused_naming_what_is_missing(
    shipped: tuple[TierMatrix, SkuCatalog],
) -> None:
    matrix, catalog = shipped
    without = {name: spec for name, spec in catalog.items() if name not in ("ADDON-SMS", "FLEET")}
    with pytest.raises(OrderRefused, match="no SKU sells add-on 'sms_messaging'") as refused:
        skus_for(without, matrix, "core", ("sms_messaging",))
    assert refused.value.rule == "no_sku"
    with pytest.raises(OrderRefused, match="no SKU sells tier 'fleet'"):
        skus_for(without, matrix, "fleet", ())
