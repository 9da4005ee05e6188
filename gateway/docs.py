"""Documents generated from ``tier_matrix.toml``, so what Sales and Support read is what the
gateways enforce.

``docs/plans.md`` (the support matrix) is generated whole; ``docs/kb/plans-and-limits.md``
is prose written by people with generated blocks where numbers appear, between markers:

    <!-- generated:plans -->
    ...replaced by ``gateway docs kb``...
    <!-- /generated:plans -->

    text = plans_markdown(matrix)                                  # docs/plans.md
    page = fill_blocks(page, kb_blocks(matrix, grace_days=7, grandfather_days=90))

Pure functions of their inputs: the tests compare the committed files with their output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from gateway.matrix import APP_NAMES, Addon, AppName, Terms, Tier, TierMatrix

APP_TITLES: dict[AppName, str] = {
    "operations": "Operations",
    "client_portal": "Client Portal",
    "driver_app": "Driver App",
}

GENERATED_NOTE = (
    "<!-- Generated from tier_matrix.toml by `gateway docs plans --out docs/plans.md`: "
    "do not edit by hand (a test compares this file with the generator's output). -->"
)

_BLOCK = re.compile(
    r"(?P<open><!-- generated:(?P<name>[a-z0-9-]+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- /generated:(?P=name) -->)",
    re.DOTALL,
)


def money(amount: float) -> str:
    """``600`` → ``$600``, ``1500`` → ``$1,500``, ``2.5`` → ``$2.50``."""
    return f"${amount:,.0f}" if amount == int(amount) else f"${amount:,.2f}"


def retention(terms: Terms) -> str:
    years = terms.retention_years
    if years == "unlimited":
        return "unlimited"
    return f"{years} year" if years == 1 else f"{years} years"


def addon_price(addon: Addon, matrix: TierMatrix) -> str:
    """One price, or the price per tier when they differ."""
    prices = list(dict.fromkeys(addon.prices.values()))
    if len(prices) == 1:
        return prices[0]
    return "; ".join(f"{matrix.tiers[tier].title}: {price}" for tier, price in addon.prices.items())


def addons_granting(matrix: TierMatrix, tier: Tier, feature: str) -> list[Addon]:
    """The add-ons a ``tier`` customer can buy that grant ``feature``."""
    return [
        addon
        for addon in matrix.addons.values()
        if tier.name in addon.available_to and feature in addon.features
    ]


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]


def _feature_cell(matrix: TierMatrix, tier: Tier, feature: str) -> str:
    if feature in tier.features:
        return "✓"
    addons = addons_granting(matrix, tier, feature)
    if not addons:
        return "—"
    return " or ".join(f"add-on `{addon.name}` ({addon.prices[tier.name]})" for addon in addons)


def plans_markdown(matrix: TierMatrix) -> str:
    """``docs/plans.md``: tiers × features × add-ons × seats × retention × support × prices."""
    tiers = list(matrix.tiers.values())
    lines = [
        GENERATED_NOTE,
        "",
        "# Plans, features and add-ons (support matrix)",
        "",
        "What every plan includes, as the gateways enforce it: generated from",
        "`tier_matrix.toml`. Each plan includes everything of the plan before it. Feature ids",
        "are what a `feature_not_entitled` answer names in `feature`; add-on names are what",
        "`gateway license issue --addon` takes. What customers see when they reach a limit:",
        "[support playbook](support.md); in plain language:",
        "[plans and limits](kb/plans-and-limits.md).",
        "",
        "## Plans",
        "",
    ]
    lines += _table(
        ["", *(f"**{tier.title}** (`{tier.name}`)" for tier in tiers)],
        [
            ["Price / month", *(money(tier.price_usd_month) for tier in tiers)],
            ["Operations users included", *(str(tier.quotas.ops_users) for tier in tiers)],
            ["Drivers included", *(str(tier.quotas.drivers) for tier in tiers)],
            ["Data retention", *(retention(tier.terms) for tier in tiers)],
            ["Support", *(tier.terms.support for tier in tiers)],
        ],
    )
    for app in APP_NAMES:
        features = [name for name, spec in matrix.features.items() if spec.app == app]
        if not features:
            continue
        lines += ["", f"## {APP_TITLES[app]}", ""]
        lines += _table(
            ["Feature", "Id", *(tier.title for tier in tiers)],
            (
                [
                    matrix.features[name].title,
                    f"`{name}`",
                    *(_feature_cell(matrix, tier, name) for tier in tiers),
                ]
                for name in features
            ),
        )
    lines += ["", "## Add-ons", ""]
    lines += _table(
        ["`--addon`", "Title", "For", "Price", "Grants"],
        (
            [
                f"`{addon.name}`",
                addon.title,
                ", ".join(matrix.tiers[tier].title for tier in addon.available_to),
                addon_price(addon, matrix),
                ", ".join(f"`{feature}`" for feature in _in_matrix_order(matrix, addon.features)),
            ]
            for addon in matrix.addons.values()
        ),
    )
    lines += [
        "",
        "An add-on is sold only to the plans under *For*; `gateway license issue --config`",
        "refuses any other combination. The highest plan needs no add-on.",
        "",
    ]
    return "\n".join(lines)


def _in_matrix_order(matrix: TierMatrix, features: Iterable[str]) -> list[str]:
    wanted = set(features)
    return [name for name in matrix.features if name in wanted]


def feature_titles(matrix: TierMatrix, features: Iterable[str]) -> str:
    """Feature titles grouped by app: ``Operations: A, B; Driver App: C``."""
    ordered = _in_matrix_order(matrix, features)
    groups = []
    for app in APP_NAMES:
        titles = [
            matrix.features[name].title for name in ordered if matrix.features[name].app == app
        ]
        if titles:
            groups.append(f"{APP_TITLES[app]}: {', '.join(titles)}")
    return "; ".join(groups)


def kb_blocks(matrix: TierMatrix, *, grace_days: int, grandfather_days: int) -> dict[str, str]:
    """The generated blocks of ``docs/kb/plans-and-limits.md``, in plain language."""
    tiers = list(matrix.tiers.values())
    plans: list[str] = []
    previous: Tier | None = None
    for tier in tiers:
        support = tier.terms.support
        support_text = "no phone support" if support == "none" else f"{support} support"
        seats = _seats(tier.quotas.ops_users, tier.quotas.drivers)
        plans.append(
            f"- **{tier.title}** — {money(tier.price_usd_month)} a month: {seats}, "
            f"{_retention_phrase(tier.terms)}, {support_text}."
        )
        if previous is None:
            plans.append(f"  Includes {feature_titles(matrix, tier.features)}.")
        else:
            plans.append(
                f"  Everything in {previous.title}, plus "
                f"{feature_titles(matrix, tier.features - previous.features)}."
            )
        previous = tier
    addons = [
        f"- **{addon.title}** — with "
        + " or ".join(
            f"{matrix.tiers[name].title} ({addon.prices[name]})" for name in addon.available_to
        )
        + f". Adds {feature_titles(matrix, addon.features)}."
        for addon in matrix.addons.values()
    ]
    seats_rows = _table(
        ["Plan", "Operations users", "Drivers"],
        ([tier.title, str(tier.quotas.ops_users), str(tier.quotas.drivers)] for tier in tiers),
    )
    lowest, top = tiers[0], tiers[-1]
    expiry = [
        f"- **Paid plans**: for {grace_days} days after the end date everything keeps working,",
        f"  with a reminder to renew. After those {grace_days} days your account moves to the",
        f"  {lowest.title} plan ({_seats(lowest.quotas.ops_users, lowest.quotas.drivers)}, "
        "no add-ons) until you renew.",
        "  Nothing is deleted, and renewing brings everything back at once.",
        "- **Trials** end on their end date, with no grace period: from then on the trial gives",
        "  no access. If you already had a plan before the trial, that plan simply applies again.",
    ]
    grandfather = [
        f"Existing X Dispatch customers keep everything they have today for **{grandfather_days}",
        "days** after they move to a new plan: during that window your account works as the",
        f"**{top.title}** plan ({_seats(top.quotas.ops_users, top.quotas.drivers)}). On the",
        "window's end date the plan you chose applies by itself: no new key, no downtime. What",
        "your plan does not include then shows as an upgrade option, and nothing else changes.",
    ]
    return {
        "plans": "\n".join(plans),
        "addons": "\n".join(addons),
        "seats": "\n".join(seats_rows),
        "expiry": "\n".join(expiry),
        "grandfather": "\n".join(grandfather),
    }


def _retention_phrase(terms: Terms) -> str:
    if terms.retention_years == "unlimited":
        return "unlimited data retention"
    return f"{retention(terms)} of data retention"


def _seats(ops_users: int, drivers: int) -> str:
    users = "1 Operations user" if ops_users == 1 else f"{ops_users} Operations users"
    driving = "1 driver" if drivers == 1 else f"{drivers} drivers"
    return f"{users} and {driving}"


def fill_blocks(text: str, blocks: Mapping[str, str]) -> str:
    """``text`` with each ``<!-- generated:NAME -->`` block replaced by ``blocks[NAME]``.
    A block the page lacks, or a marker naming no block, is a ``ValueError``."""
    seen: set[str] = set()

    def replace(found: re.Match[str]) -> str:
        name = found.group("name")
        if name not in blocks:
            raise ValueError(f"unknown generated block {name!r} (known: {', '.join(blocks)})")
        seen.add(name)
        return f"{found.group('open')}{blocks[name]}\n{found.group('close')}"

    filled = _BLOCK.sub(replace, text)
    missing = [name for name in blocks if name not in seen]
    if missing:
        raise ValueError(
            "no <!-- generated:NAME --> ... <!-- /generated:NAME --> markers for "
            + ", ".join(missing)
        )
    return filled
