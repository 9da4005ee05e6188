"""The plan page in a real browser: Debian's Chromium driven by Playwright, one browser
for the module. The page is served by ``tests.page_harness.PlanPageServer`` (our page
assets, entitlements body and click validation behind a loopback aiohttp server) until
the proxy serves it. The browser context sends the identity headers on every request, as
the front layer does in a tenant's session.

``pytest tests/test_plan_page.py --screenshots`` also writes docs/screenshots/*.png.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from gateway.config import Settings, load_settings
from gateway.decision import Policy
from gateway.entitlements import UpsellMode
from gateway.license import License, Seats
from gateway.matrix import AppName, TierMatrix
from tests.page_harness import PlanPageServer
from tests.test_decision import make_license

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (scripts/system-deps)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DAY = 86400
BLOCKED = "ops.basic_shipment_optimization"
FROM = "1a2b-6b0256c6-1f"
UPSELL: dict[AppName, UpsellMode] = {
    "operations": "tag",
    "client_portal": "tag",
    "driver_app": "hide",
}


def license_for(tenant: str, **claims: Any) -> License:
    """A license valid for 30 more days of real time (the page server decides at now)."""
    now = int(time.time())
    fields: dict[str, Any] = {"iat": now - DAY, "nbf": now - DAY, "exp": now + 30 * DAY}
    return make_license(sub=tenant, jti=f"lic-{tenant}", **{**fields, **claims})


LICENSES = {
    "acme": license_for("acme", trial=True, expiry="restrict", addons=("sms_messaging",)),
    "lapsed": license_for("lapsed", tier="fleet", exp=int(time.time()) - 2 * DAY),
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # One browser for all the browser tests, which live in this module. Module scope, not
    # session: while Playwright's sync API runs, this thread counts as inside an event
    # loop, and the asyncio tests of the following modules could not start theirs.
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: run scripts/system-deps (make test does)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


def start_server(matrix: TierMatrix, prefix: str) -> Iterator[PlanPageServer]:
    shipped: Settings = load_settings(REPO / "gateway.toml")
    settings = msgspec.structs.replace(
        shipped, entitlements=msgspec.structs.replace(shipped.entitlements, prefix=prefix)
    )
    server = PlanPageServer(
        settings, Policy(matrix=matrix), LICENSES, UPSELL, usage=Seats(ops_users=1, drivers=3)
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(matrix: TierMatrix) -> Iterator[PlanPageServer]:
    yield from start_server(matrix, "/_entitlements")


@pytest.fixture(scope="module")
def mounted_server(matrix: TierMatrix) -> Iterator[PlanPageServer]:
    """The same, under a prefix a front layer might add in front of the gateway's."""
    yield from start_server(matrix, "/tenant/gw/_entitlements")


class Visit:
    """One page load as one user; console errors (a CSP violation, a script error) are
    collected so every test can check there were none."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@pytest.fixture
def visit(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Any]:
    contexts = []

    def open_page(
        server: PlanPageServer, role: str | None, tenant: str = "acme", query: str = ""
    ) -> Visit:
        headers = {"X-Tenant-Id": tenant, "X-User-Id": f"{role}-1"}
        if role is not None:
            headers["X-User-Role"] = role
        context = browser.new_context(
            extra_http_headers=headers,
            locale="en-US",
            viewport={"width": 1100, "height": 900},
        )
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        seen = Visit(page)
        page.goto(f"{server.base}/ui{query}")
        page.locator("#features").wait_for(state="visible")
        return seen

    yield open_page
    for context in contexts:
        context.close()


def screenshot(request: pytest.FixtureRequest, page: Page, name: str) -> None:
    if request.config.getoption("--screenshots"):
        folder = REPO / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def modal_has_focus(page: Page) -> bool:
    return bool(page.evaluate("document.getElementById('modal').contains(document.activeElement)"))


def test_owner_sees_the_plan_and_upgrades_the_blocked_feature(
    server: PlanPageServer, visit: Any, request: pytest.FixtureRequest
) -> None:
    seen = visit(server, "owner", query=f"?from={FROM}&feature={BLOCKED}")
    page = seen.page
    assert page.locator("#plan-badge").inner_text() == "Core"
    assert "trial of Core" in page.locator("#banners").inner_text()
    assert page.locator("#seat-ops_users").get_attribute("value") == "1"
    assert "Drivers: 3 of 1 used (over the plan)" in page.locator("#seats").inner_text()
    # Features grouped by app: included, locked with the tier tag; hidden ones absent.
    assert page.locator("#app-operations").inner_text() == "Operations"
    on_demand = page.locator('[id="feature-ops.on_demand"]')
    assert on_demand.get_attribute("data-state") == "enabled"
    assert "Included" in on_demand.inner_text()
    blocked_row = page.locator(f'[id="feature-{BLOCKED}"]')
    assert blocked_row.get_attribute("data-state") == "locked"
    assert blocked_row.get_attribute("aria-current") == "true"
    assert blocked_row.locator(".chip").text_content() == "Requires Fleet"
    assert page.locator('[id="feature-driver.depot_scanning"]').count() == 0  # driver_app: hide
    assert page.locator('[id="feature-driver.on_demand"]').count() == 1
    # Add-on cards with prices; the callout for the blocked feature.
    cards = page.locator("#addon-cards .card")
    assert cards.count() == 2
    assert "$500/mo" in cards.nth(0).inner_text()
    assert "is not in your Core plan" in page.locator("#blocked-title").inner_text()
    assert page.get_by_role("button", name="Ask your admin").count() == 0
    screenshot(request, page, "owner")

    # Keyboard only: focus the callout's upgrade button, Enter, the dialog takes focus.
    upgrade = page.locator("#blocked-actions button", has_text="Upgrade to Fleet")
    upgrade.focus()
    with page.expect_response(f"{server.base}/events") as answered:
        page.keyboard.press("Enter")
    assert answered.value.status == 202
    posted = answered.value.request.post_data_json
    assert posted == {
        "event": "upgrade_click",
        "feature": BLOCKED,
        "target": "tier:fleet",
        "source_request_id": FROM,
    }
    dialog = page.get_by_role("dialog", name="Upgrade to the Fleet plan")
    assert dialog.is_visible()
    assert "Basic Shipment Optimization" in dialog.inner_text()
    assert page.locator("#main").get_attribute("inert") == ""
    for key in ("Tab", "Tab", "Tab", "Shift+Tab", "Shift+Tab"):
        page.keyboard.press(key)
        assert modal_has_focus(page), f"focus left the dialog after {key}"
    page.get_by_text("We have noted your request").wait_for()
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    assert page.evaluate("document.activeElement.textContent") == "Upgrade to Fleet"
    # An add-on card buys the add-on; the server stamped both clicks with the caller.
    with page.expect_response(f"{server.base}/events"):
        page.locator("#addon-cards").get_by_role("button", name="Add Route & Distribution").click()
    page.keyboard.press("Escape")
    stamped = server.events[-2:]
    assert [(e["tenant"], e["tier"], e["role"], e["user"]) for e in stamped] == [
        ("acme", "core", "owner", "owner-1")
    ] * 2
    assert [e["target"] for e in stamped] == ["tier:fleet", "addon:route_distribution"]
    assert seen.errors == []


def test_standard_user_gets_a_nudge_to_ask_the_admin(
    mounted_server: PlanPageServer, visit: Any, request: pytest.FixtureRequest
) -> None:
    seen = visit(mounted_server, "standard", query=f"?feature={BLOCKED}")
    page = seen.page
    assert page.get_by_role("button", name="Upgrade to Fleet").count() == 0
    assert page.locator("button", has_text="Add ").count() == 0
    row = page.locator(f'[id="feature-{BLOCKED}"]')
    nudge = row.get_by_role("button", name="Ask your admin")
    # The tooltip shows on keyboard focus and describes the button.
    nudge.focus()
    tip = row.get_by_role("tooltip")
    assert tip.is_visible()
    assert "Only owners and admins can change the plan" in tip.inner_text()
    assert (tip.get_attribute("id") or "") in (nudge.get_attribute("aria-describedby") or "")
    screenshot(request, page, "standard")
    page.keyboard.press("Escape")  # dismisses the tooltip (WCAG 1.4.13)
    assert not tip.is_visible()

    with page.expect_response(f"{mounted_server.base}/events") as answered:
        page.keyboard.press("Enter")
    assert answered.value.status == 202
    assert answered.value.request.post_data_json == {
        "event": "upgrade_click",
        "feature": BLOCKED,
        "target": "tier:fleet",
    }
    dialog = page.get_by_role("dialog", name="Ask your admin")
    assert dialog.is_visible()
    assert "Only an owner or admin of your account can change the plan" in dialog.inner_text()
    assert modal_has_focus(page)
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    assert mounted_server.events[-1]["role"] == "standard"
    assert seen.errors == []


def test_dispatch_only_sees_no_upsell_at_all(
    server: PlanPageServer, visit: Any, request: pytest.FixtureRequest
) -> None:
    before = len(server.events)
    seen = visit(server, "dispatch_only", query=f"?from={FROM}&feature={BLOCKED}")
    page = seen.page
    assert page.locator("#plan-badge").inner_text() == "Core"
    states = page.locator(".feature").evaluate_all("rows => rows.map(r => r.dataset.state)")
    assert states and set(states) == {"enabled"}
    assert page.locator("main button").count() == 0
    assert page.locator("#addons").is_hidden()
    assert page.locator("#blocked").is_hidden()
    assert "Fleet" not in page.locator("main").inner_text()
    screenshot(request, page, "dispatch_only")
    assert len(server.events) == before
    assert seen.errors == []


def test_a_lapsed_license_shows_the_grace_banner(server: PlanPageServer, visit: Any) -> None:
    seen = visit(server, "admin", tenant="lapsed")
    banner = seen.page.locator("#banners").inner_text()
    assert "Your license expired on" in banner and "grace period" in banner
    assert seen.page.locator("#renewal-label").inner_text() == "Expired"
    assert seen.errors == []


def test_without_a_license_the_page_says_why(server: PlanPageServer, browser: Browser) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.base}/ui")
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "could not be loaded (401)" in alert.inner_text()
        assert "send a license key or a known tenant id" in alert.inner_text()
    finally:
        context.close()
