"""The plan page in a real browser against a real gateway: Debian's Chromium driven by
Playwright, one browser and one running gateway (echo upstreams, a store seeded with the
tenants below) for the module. The browser context sends the identity headers on every
request, as the front layer does in a tenant's session; each page is opened from a real
403's ``upgrade`` link, and the clicks it sends are read back from the gateway's events file.

``pytest tests/test_plan_page.py --screenshots`` also writes docs/screenshots/*.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.conftest import IssueKey
from tests.harness import GatewayThread, gateway_in_thread

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
PREFIX = "/_entitlements"
BLOCKED = "ops.basic_shipment_optimization"
BLOCKED_CALL = "/api/v1/shipments/1/optimize"  # a Core key gets a 403 for BLOCKED
# Operations and the client portal tag what the plan lacks; the driver app hides it.
UPSELL = {"operations": 'upsell = "tag"\n', "client_portal": 'upsell = "tag"\n'}


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


@pytest.fixture(scope="module")
def plan_gateway(
    tmp_path_factory: pytest.TempPathFactory, key_dir: Path, issue_key: IssueKey
) -> Iterator[GatewayThread]:
    """A gateway whose store holds acme (a Core trial with SMS Messaging, 1 ops user and 3
    drivers in use) and lapsed (Fleet, expired two days ago: in its grace period)."""
    now = int(time.time())
    acme = issue_key(
        sub="acme", jti="lic-acme", trial=True, expiry="restrict", addons=("sms_messaging",),
        iat=now - DAY, nbf=now - DAY, exp=now + 30 * DAY,
    )  # fmt: skip
    lapsed = issue_key(
        sub="lapsed", jti="lic-lapsed", tier="fleet",
        iat=now - 30 * DAY, nbf=now - 30 * DAY, exp=now - 2 * DAY,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("plan-page")
    (folder / "tenants.toml").write_text(
        f'[[tenants]]\nid = "acme"\nkeys = ["{acme}"]\n\n'
        f'[[tenants]]\nid = "lapsed"\nkeys = ["{lapsed}"]\n'
    )
    seeded = '[store]\nseed = "tenants.toml"\n'
    with gateway_in_thread(folder, key_dir, app_extra=UPSELL, extra=seeded) as running:
        running.run(running.gateway.runtime.store.set_usage("acme", ops_users=1, drivers=3))
        yield running


class Visit:
    """One page load as one user: the page, the 403 that linked to it, and the console
    errors (a CSP violation, a script error) that every test checks there were none of."""

    def __init__(self, page: Page, refusal: dict[str, Any]) -> None:
        self.page = page
        self.refusal = refusal
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


Visitor = Callable[..., Visit]


@pytest.fixture
def visit(browser: Browser, plan_gateway: GatewayThread) -> Iterator[Visitor]:
    """``visit(role, tenant="acme")``: the user calls the blocked route, gets a real 403
    and opens the page from its ``upgrade`` link (``after_403=False``: opens the page), with
    the identity headers the front layer would set on every request."""
    contexts = []

    def open_page(role: str | None, tenant: str = "acme", *, after_403: bool = True) -> Visit:
        headers = {"X-Tenant-Id": tenant, "X-User-Id": f"{role}-1"}
        if role is not None:
            headers["X-User-Role"] = role
        context = browser.new_context(
            base_url=plan_gateway.gateway.url("operations", ""),
            extra_http_headers=headers,
            locale="en-US",
            viewport={"width": 1100, "height": 900},
        )
        contexts.append(context)
        refusal: dict[str, Any] = {}
        link = f"{PREFIX}/ui"
        if after_403:
            refused = context.request.post(BLOCKED_CALL)
            assert refused.status == 403
            refusal = refused.json()
            # dispatch_only's 403 has no upgrade link: open the page as if one were shared.
            link = refusal.get("upgrade", f"{link}?from={refusal['request_id']}&feature={BLOCKED}")
        page = context.new_page()
        page.set_default_timeout(10_000)
        seen = Visit(page, refusal)
        page.goto(link)
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


def clicks_of(gateway: GatewayThread, user: str) -> list[tuple[Any, ...]]:
    """The ``upgrade_click`` events of ``user`` in the events file, as (tenant, tier, role,
    feature, target, source_request_id)."""
    return [
        (e["tenant"], e["tier"], e["role"], e["feature"], e["target"], e["source_request_id"])
        for e in gateway.events("upgrade_click")
        if e["user"] == user
    ]


def test_owner_sees_the_plan_and_upgrades_the_blocked_feature(
    plan_gateway: GatewayThread, visit: Visitor, request: pytest.FixtureRequest
) -> None:
    seen = visit("owner")
    page = seen.page
    source = seen.refusal["request_id"]
    assert seen.refusal["upgrade"] == f"{PREFIX}/ui?from={source}&feature={BLOCKED}"
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
    events_url = plan_gateway.gateway.url("operations", f"{PREFIX}/events")
    page.locator("#blocked-actions button", has_text="Upgrade to Fleet").focus()
    with page.expect_response(events_url) as answered:
        page.keyboard.press("Enter")
    assert answered.value.status == 202
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
    # An add-on card buys the add-on; the gateway stamped both clicks with the caller.
    with page.expect_response(events_url):
        page.locator("#addon-cards").get_by_role("button", name="Add Route & Distribution").click()
    page.keyboard.press("Escape")
    assert clicks_of(plan_gateway, "owner-1") == [
        ("acme", "core", "owner", BLOCKED, "tier:fleet", source),
        ("acme", "core", "owner", "ops.route_distribution", "addon:route_distribution", source),
    ]
    assert seen.errors == []


def test_standard_user_gets_a_nudge_to_ask_the_admin(
    plan_gateway: GatewayThread, visit: Visitor, request: pytest.FixtureRequest
) -> None:
    seen = visit("standard")
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

    events_url = plan_gateway.gateway.url("operations", f"{PREFIX}/events")
    with page.expect_response(events_url) as answered:
        page.keyboard.press("Enter")
    assert answered.value.status == 202
    dialog = page.get_by_role("dialog", name="Ask your admin")
    assert dialog.is_visible()
    assert "Only an owner or admin of your account can change the plan" in dialog.inner_text()
    assert modal_has_focus(page)
    page.keyboard.press("Escape")
    assert not dialog.is_visible()
    source = seen.refusal["request_id"]
    assert clicks_of(plan_gateway, "standard-1") == [
        ("acme", "core", "standard", BLOCKED, "tier:fleet", source)
    ]
    assert seen.errors == []


def test_dispatch_only_sees_no_upsell_at_all(
    plan_gateway: GatewayThread, visit: Visitor, request: pytest.FixtureRequest
) -> None:
    seen = visit("dispatch_only")
    assert "upgrade" not in seen.refusal  # no nudge in the 403 either
    page = seen.page
    assert page.locator("#plan-badge").inner_text() == "Core"
    states = page.locator(".feature").evaluate_all("rows => rows.map(r => r.dataset.state)")
    assert states and set(states) == {"enabled"}
    assert page.locator("main button").count() == 0
    assert page.locator("#addons").is_hidden()
    assert page.locator("#blocked").is_hidden()
    assert "Fleet" not in page.locator("main").inner_text()
    screenshot(request, page, "dispatch_only")
    assert clicks_of(plan_gateway, "dispatch_only-1") == []
    assert seen.errors == []


def test_a_lapsed_license_shows_the_grace_banner(visit: Visitor) -> None:
    seen = visit("admin", tenant="lapsed", after_403=False)
    banner = seen.page.locator("#banners").inner_text()
    assert "Your license expired on" in banner and "grace period" in banner
    assert seen.page.locator("#renewal-label").inner_text() == "Expired"
    assert seen.errors == []


def test_without_a_license_the_page_says_why(plan_gateway: GatewayThread, browser: Browser) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(plan_gateway.gateway.url("operations", f"{PREFIX}/ui"))
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "could not be loaded (401)" in alert.inner_text()
        assert "send a license key or a known tenant id" in alert.inner_text()
    finally:
        context.close()
