"""What ``make demo`` prints once everything runs: addresses, keys, and commands to paste.

Every command is printed as ``  # what it shows  [expect STATUS]`` (an HTTP status) or
``[exit CODE]`` (an operator command), followed by its lines and a blank line;
tests/test_demo.py runs each one in order and checks it. Paths are the demo's own, shown
relative to the current folder when they are under it.

    print(guide(setup, gateway_bin()))
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import msgspec

from gateway.demo_setup import KID, ROOT, DemoSetup

PROVISIONED_TENANT = "demo-new"  # unknown until the provisioning example adds it
UPGRADED_TENANT = "demo-core"  # on Core until the issuer order upgrades it to Fleet


class Example(msgspec.Struct, frozen=True):
    what: str
    expect: str  # "200" (HTTP status) or "exit 0"
    lines: tuple[str, ...]


def shown(path: Path) -> str:
    """``path`` relative to the current folder when under it (what a user pastes), quoted."""
    cwd = Path.cwd()
    return shlex.quote(str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path))


def gateway_bin() -> str:
    """The ``gateway`` command next to this Python (``.venv/bin/gateway``), else the PATH's."""
    beside = Path(sys.executable).parent / "gateway"
    return shown(beside) if beside.exists() else "gateway"


def _signed_post(url: str, secret_env: str, body_lines: tuple[str, ...]) -> tuple[str, ...]:
    """Lines that set ``BODY``, sign it as README "How billing provisions a tenant" says
    (``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``) and post it."""
    return (
        *body_lines,
        "T=$(date +%s)",
        f'SIG=$(printf \'%s.%s\' "$T" "$BODY" | openssl dgst -sha256 -hmac "${secret_env}" '
        "-hex | sed 's/^.* //')",
        f'curl -s -X POST {url} -H "Gateway-Signature: t=$T,v1=$SIG" '
        "-H 'Content-Type: application/json' --data \"$BODY\"; echo",
    )


def examples(setup: DemoSetup, gateway: str) -> list[Example]:
    """The curl examples, in the order they are printed (and run by the tests): the
    provisioning call and the issuer order change what the line after each returns."""
    ops, portal, driver = (f"http://127.0.0.1:{port}" for port in setup.ports.listeners.values())
    admin = f"http://127.0.0.1:{setup.ports.admin}"
    optimize = f"-X POST {ops}/api/v1/shipments/42/optimize"
    core_optimize = f'curl -s {optimize} -H "X-License-Key: $CORE_KEY"; echo'
    new_tenant = f'curl -s {driver}/api/v1/osd/reports -H "X-Tenant-Id: {PROVISIONED_TENANT}"; echo'

    def curl(what: str, status: int, command: str) -> Example:
        return Example(what, str(status), (command,))

    issue = (
        f"KEY=$({gateway} license issue --signing-key {shown(setup.signing_key)} "
        f"--config {shown(setup.path('gateway.toml'))} --tenant {PROVISIONED_TENANT} "
        "--tier fleet --reason demo)"
    )
    provision_body = (
        'BODY=$(printf \'{"event_id":"evt-%s","action":"license","tenant":"'
        + PROVISIONED_TENANT
        + '","key":"%s"}\' "$(date +%s%N)" "$KEY")'
    )
    order_body = (
        'BODY=$(printf \'{"order_id":"demo-order-%s","tenant":"'
        + UPGRADED_TENANT
        + '","skus":["FLEET"]}\' "$(date +%s%N)")'
    )
    return [
        curl("allowed: Fleet includes Basic Shipment Optimization, the upstream answers", 200,
             f'curl -s {optimize} -H "X-License-Key: $FLEET_KEY"; echo'),
        curl("blocked at the edge: Core does not; problem+json names the tier and add-on", 403,
             core_optimize),
        curl("the Route & Distribution add-on unlocks routes on Core", 200,
             f'curl -s {ops}/api/v1/routes -H "X-License-Key: $CORE_RD_KEY"; echo'),
        curl("Enterprise-only Health Data Protection: Fleet is blocked", 403,
             f'curl -s {ops}/api/v1/phi/records/7 -H "X-License-Key: $FLEET_KEY"; echo'),
        curl("... and Enterprise is allowed", 200,
             f'curl -s {ops}/api/v1/phi/records/7 -H "X-License-Key: $ENTERPRISE_KEY"; echo'),
        curl("a driver with the dispatch_only role is blocked without upsell fields", 403,
             f'curl -s -X POST {driver}/api/v1/scans/depot -H "X-License-Key: $CORE_KEY" '
             '-H "X-User-Role: dispatch_only"; echo'),
        curl("classic X Dispatch traffic passes through untouched, ungated", 200,
             f'curl -s {optimize} -H "X-License-Key: $CLASSIC_KEY"; echo'),
        curl("a trial key works like Fleet until it ends (then 401, no grace)", 200,
             f'curl -s {portal}/api/v1/chat/widget.js -H "X-License-Key: $TRIAL_KEY"; echo'),
        curl("expired but in grace: allowed, with an X-License-Warning header", 200,
             f'curl -si {portal}/api/v1/branding/logo.png -H "X-License-Key: $GRACE_KEY"; echo'),
        curl("no key, only the tenant id: the tenant's license comes from the store", 200,
             f'curl -s {driver}/api/v1/osd/reports -H "X-Tenant-Id: demo-fleet"; echo'),
        curl("no license at all", 401, f"curl -s {ops}/api/v1/shipments; echo"),
        curl("a public route needs none", 200, f"curl -s {ops}/api/v1/health; echo"),
        curl(f"tenant {PROVISIONED_TENANT} is not in the store yet", 401, new_tenant),
        Example(
            f"billing provisions {PROVISIONED_TENANT}: a Fleet key from the demo signing key, "
            "posted to the hook with an HMAC signature (openssl)",
            "200",
            _signed_post(f"{admin}/admin/provision", "GATEWAY_PROVISION_SECRET",
                         (issue, provision_body)),
        ),
        curl(f"... now the tenant id alone is enough: {PROVISIONED_TENANT} is on Fleet", 200,
             new_tenant),
        Example(
            f"billing orders Fleet for {UPGRADED_TENANT} from the issuing service: it mints the "
            "license and delivers it to this gateway's hook (see deliveries)",
            "201",
            _signed_post(f"http://127.0.0.1:{setup.ports.issuer}/v1/orders",
                         "ISSUER_BILLING_SECRET", (order_body,)),
        ),
        curl("upgrades apply at once: the same Core key is now decided on the Fleet license",
             200, core_optimize),
        curl("the metrics", 200,
             f"curl -s {admin}/metrics | grep -E '^gateway_(requests|feature_block)_total'"),
    ]  # fmt: skip


def operator_commands(setup: DemoSetup, gateway: str) -> list[Example]:
    """The operator verbs a user looks for, on the demo's files (each exits 0 here)."""
    config = f"--config {shown(setup.path('gateway.toml'))}"
    audit = f"--log {shown(setup.path('audit.jsonl'))}"
    examples_dir = ROOT / "docs" / "examples"

    def run(what: str, command: str) -> Example:
        return Example(what, "exit 0", (f"{gateway} {command}",))

    return [
        run("every tenant in the demo store: tier, add-ons, end date, state",
            f"tenant list {config}"),
        run("one tenant's licenses: in force, superseded, scheduled",
            f"tenant show {UPGRADED_TENANT} {config}"),
        run("the audit trail is intact (hash chain)", f"audit verify {audit}"),
        run("who issued and provisioned what for a tenant", f"audit show --tenant "
            f"{UPGRADED_TENANT} {audit}"),
        run("deliveries the issuer gave up on", "issuer dead-letters --config "
            f"{shown(setup.path('issuer.toml'))}"),
        run("blocks, clicks and upgrades per feature, from the events file",
            f"report funnel --events {shown(setup.path('events.jsonl'))}"),
        run("the classic regression suite through this gateway's config",
            f"replay --har {shown(examples_dir / 'classic.har')} --app operations {config}"),
        run("every operation of the Operations API has a route", f"routes coverage {config} "
            f"--app operations --openapi {shown(ROOT / 'docs' / 'openapi' / 'operations.yaml')}"),
        run("what migrating the classic customers would do (writes nothing)",
            f"migrate --plan {shown(examples_dir / 'customers.csv')} {config} --dry-run"),
        run("why was the Core key blocked?", f"explain {config} --app operations "
            'POST /api/v1/shipments/42/optimize --key "$CORE_KEY"'),
    ]  # fmt: skip


def _block(example: Example) -> list[str]:
    tag = f"expect {example.expect}" if example.expect.isdigit() else example.expect
    return [f"  # {example.what}  [{tag}]", *(f"  {line}" for line in example.lines), ""]


def guide(setup: DemoSetup, gateway: str) -> str:
    ports = setup.ports
    lines = ["", "Entitlement gateway demo is running."]
    for app, listen in ports.listeners.items():
        lines.append(
            f"  {app:14} http://127.0.0.1:{listen}  -> demo upstream :{ports.upstreams[app]}"
        )
    lines += [
        f"  {'admin':14} http://127.0.0.1:{ports.admin}  (/metrics /healthz /readyz "
        "/admin/config /admin/provision)",
        f"  {'issuer':14} http://127.0.0.1:{ports.issuer}  (POST /v1/orders; "
        f"config {shown(setup.path('issuer.toml'))})",
        f"  {'signing key':14} {shown(setup.signing_key)}  (kid {KID}; the gateway loads "
        f"{shown(setup.path('keys'))}/{KID}.pub)",
        f"  {'store':14} {shown(setup.path('store.db'))}  (SQLite)",
        f"  {'audit log':14} {shown(setup.path('audit.jsonl'))}",
        f"  {'events':14} {shown(setup.path('events.jsonl'))}",
        f"  {'access log':14} {shown(setup.path('access.jsonl'))}",
        "",
        f"Sample keys and the secrets (also in {shown(setup.path('keys.env'))}):",
        "  CORE_KEY        Core                         tenant demo-core",
        "  FLEET_KEY       Fleet                        tenant demo-fleet (also in the store)",
        "  ENTERPRISE_KEY  Enterprise                   tenant demo-enterprise",
        "  CORE_RD_KEY     Core + Route & Distribution  tenant demo-core-rd",
        "  TRIAL_KEY       Fleet trial, 14 days         tenant demo-trial",
        "  GRACE_KEY       Fleet, expired 2 days ago, in its 7-day grace period",
        f"  CLASSIC_KEY     {setup.keys['CLASSIC_KEY']} (classic X Dispatch)",
        "  GATEWAY_PROVISION_SECRET  the gateway's provisioning hook secret",
        "  ISSUER_BILLING_SECRET     billing's secret for the issuing service",
        "",
        "In another terminal, from this folder, paste these in order:",
        f"  source {shown(setup.path('keys.env'))}",
        "",
    ]
    for example in examples(setup, gateway):
        lines += _block(example)
    lines += ["Operator commands (same terminal):", ""]
    for example in operator_commands(setup, gateway):
        lines += _block(example)
    lines += [
        "The store, ledger and logs start empty on every `make demo`; the signing key stays.",
        "Ctrl-C stops the gateway, the issuer and the demo upstreams.",
        "",
    ]
    return "\n".join(lines)
