"""Command-line verbs for Sales, Billing and Support: generated documents, tenant views,
reconciliation with billing, and the migration of classic customers.

    gateway docs plans --out docs/plans.md [--check]
    gateway docs kb --out docs/kb/plans-and-limits.md [--check]
    gateway tenant show acme [--json]
    gateway tenant list [--json]
    gateway tenant reconcile --billing export.csv [--json]
    gateway migrate --plan customers.csv --config gateway.toml (--dry-run | --apply --signing-key K)

Registered from ``gateway.cli`` by ``add_parsers``; each verb's parser carries its handler.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from gateway import migration
from gateway.cli import EXIT_INVALID, EXIT_OK, UsageError, _date, _iso, run_on_store
from gateway.config import Config, LicenseSettings, load_config
from gateway.csvrows import utc_day
from gateway.docs import feature_titles, fill_blocks, kb_blocks, money, plans_markdown
from gateway.license import LicenseClaims, Seats, load_signing_key, sign_license
from gateway.matrix import TierMatrix, load_matrix
from gateway.store import TenantStore
from gateway.tenant_view import SeatView, TenantView, read_billing, reconcile, tenant_view


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    tenant: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``docs``, ``migrate`` and the ``tenant show|list|reconcile`` verbs."""
    docs = commands.add_parser("docs", help="documents generated from tier_matrix.toml")
    docs_verbs = docs.add_subparsers(dest="docs_command", required=True, metavar="VERB")
    plans = docs_verbs.add_parser("plans", help="docs/plans.md: the support matrix")
    plans.set_defaults(handler=_docs_plans)
    kb = docs_verbs.add_parser("kb", help="the generated blocks of docs/kb/plans-and-limits.md")
    kb.set_defaults(handler=_docs_kb)
    for verb in (plans, kb):
        verb.add_argument("--matrix", type=Path, default=Path("tier_matrix.toml"))
        verb.add_argument("--check", action="store_true", help="exit 1 if --out is not current")
    plans.add_argument("--out", type=Path, help="write here (default: print)")
    kb.add_argument("--out", type=Path, required=True, help="the page to update in place")

    show = tenant.add_parser("show", help="a tenant's licenses, state and seats")
    show.add_argument("tenant_id")
    show.set_defaults(handler=_tenant_show)
    listed = tenant.add_parser("list", help="every tenant: license in force, tier, state")
    listed.set_defaults(handler=_tenant_list)
    rec = tenant.add_parser("reconcile", help="drift between a billing export and the store")
    rec.add_argument("--billing", type=Path, required=True, metavar="CSV")
    rec.set_defaults(handler=_tenant_reconcile)
    for verb in (show, listed, rec):
        verb.add_argument("--config", type=Path, default=Path("gateway.toml"))
        verb.add_argument("--json", action="store_true")

    migrate = commands.add_parser("migrate", help="move classic customers to the new tiers")
    migrate.set_defaults(handler=_migrate)
    migrate.add_argument("--plan", type=Path, required=True, metavar="CSV")
    migrate.add_argument("--config", type=Path, default=Path("gateway.toml"))
    mode = migrate.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="report only; nothing is written")
    mode.add_argument("--apply", action="store_true", help="issue, store and import")
    migrate.add_argument("--signing-key", type=Path, help="the private key (with --apply)")
    migrate.add_argument(
        "--start", type=_date, metavar="DATE", help="migration day (default: today, or the day "
        "of the customer's earlier migration)"
    )  # fmt: skip
    term = migrate.add_mutually_exclusive_group()
    term.add_argument("--days", type=int, default=migration.DEFAULT_TERM_DAYS)
    term.add_argument("--expires", type=_date, metavar="DATE")
    migrate.add_argument("--grandfather-tier", help="the window's tier (default: the top tier)")


# -- docs ---------------------------------------------------------------------------------------


def _docs_plans(args: argparse.Namespace) -> int:
    text = plans_markdown(load_matrix(args.matrix))
    if args.out is None:
        if args.check:
            raise UsageError("--check needs --out (the file to compare)")
        sys.stdout.write(text)
        return EXIT_OK
    return _write_or_check(args.out, text, args.check, "gateway docs plans")


def _docs_kb(args: argparse.Namespace) -> int:
    blocks = kb_blocks(
        load_matrix(args.matrix),
        grace_days=LicenseSettings().grace_days,
        grandfather_days=migration.DEFAULT_GRANDFATHER_DAYS,
    )
    return _write_or_check(
        args.out, fill_blocks(args.out.read_text(), blocks), args.check, "gateway docs kb"
    )


def _write_or_check(path: Path, text: str, check: bool, command: str) -> int:
    current = path.read_text() if path.exists() else None
    if check:
        if current == text:
            print(f"{path}: up to date")
            return EXIT_OK
        print(f"{path}: differs from tier_matrix.toml; run {command} --out {path}")
        return EXIT_INVALID
    if current != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"{path}: {'unchanged' if current == text else 'written'}")
    return EXIT_OK


# -- tenant views ---------------------------------------------------------------------------


def _tenant_show(args: argparse.Namespace) -> int:
    async def job(config: Config, store: TenantStore) -> int:
        record = await store.get(args.tenant_id)
        if record is None:
            print(f"gateway: tenant {args.tenant_id!r} is not in the store", file=sys.stderr)
            return EXIT_INVALID
        view = tenant_view(record, config.policy, time.time())
        if args.json:
            usage = msgspec.to_builtins(record.usage)
            print(msgspec.json.encode(_show_json(view) | {"usage": usage}).decode())
        else:
            _print_show(view)
        return EXIT_OK

    return run_on_store(load_config(args.config), job)


def _show_json(view: TenantView) -> dict[str, Any]:
    shown: dict[str, Any] = msgspec.to_builtins(view)
    # Dates as text, as `tenant show --json` always gave them.
    for item in (shown, *shown["licenses"]):
        for name in ("not_before", "expires", "grandfather_until", "grandfathered_until"):
            if item.get(name) is not None:
                item[name] = _iso(item[name])
    return shown


def _tier_text(view: TenantView) -> str:
    """The license's tier, and what the gateways grant instead when that differs."""
    if view.tier is None:
        return "-"
    if view.effective_tier is None or view.effective_tier == view.tier:
        return view.tier
    if view.grandfathered_until is not None:
        return f"{view.tier} (as {view.effective_tier} until {utc_day(view.grandfathered_until)})"
    return f"{view.tier} (now {view.effective_tier})"


def _state_text(view: TenantView) -> str:
    return f"{view.state}, trial" if view.trial else view.state


LIMIT_NAMES = {"ops_users": "Operations users", "drivers": "drivers"}


def _seat_text(name: str, seat: SeatView) -> str:
    what = LIMIT_NAMES.get(name, name)
    if seat.used is None:
        return f"{what}: {seat.included} included (usage not reported)"
    full = "  AT THE LIMIT" if seat.used >= seat.included else ""
    return f"{what}: {seat.used} used of {seat.included} included{full}"


def _print_show(view: TenantView) -> None:
    print(f"tenant:     {view.tenant}{'  (SUSPENDED)' if view.suspended else ''}")
    print(f"state:      {_state_text(view)}")
    if view.current is not None:
        addons = ", ".join(view.addons) or "-"
        print(f"plan:       {_tier_text(view)}; add-ons: {addons}")
        print(f"expires:    {_iso(view.expires or 0)}")
    if view.note:
        print(f"note:       {view.note}")
    for index, (name, seat) in enumerate(view.seats.items()):
        print(f"{'seats:' if index == 0 else '':12}{_seat_text(name, seat)}")
    for lic in view.licenses:
        mark = "*" if lic.status == "in_force" else " "
        addons = f" + {', '.join(lic.addons)}" if lic.addons else ""
        flags = [lic.status.replace("_", " ")] + (["trial"] if lic.trial else [])
        if lic.grandfather_tier and lic.grandfather_until:
            flags.append(
                f"grandfather {lic.grandfather_tier} until {utc_day(lic.grandfather_until)}"
            )
        print(
            f" {mark} {lic.license_id}  {lic.tier}{addons}  serial {lic.serial}  "
            f"{_iso(lic.not_before)} .. {_iso(lic.expires)}  [{', '.join(flags)}]"
        )
    if view.revoked:
        print(f"revoked:    {', '.join(view.revoked)}")
    print("(* = the license in force now)")


def _tenant_list(args: argparse.Namespace) -> int:
    async def job(config: Config, store: TenantStore) -> int:
        now = time.time()
        views = [tenant_view(record, config.policy, now) for record in await store.list_tenants()]
        if args.json:
            print(msgspec.json.encode([_list_json(view) for view in views]).decode())
            return EXIT_OK
        rows = [["TENANT", "STATE", "TIER", "ADD-ONS", "EXPIRES", "LICENSE IN FORCE"]]
        rows += [
            [
                view.tenant,
                _state_text(view),
                _tier_text(view),
                ",".join(view.addons) or "-",
                utc_day(view.expires),
                view.current or "-",
            ]
            for view in views
        ]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        for row in rows:
            print(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
        print(f"{len(views)} tenants")
        return EXIT_OK

    return run_on_store(load_config(args.config), job)


def _list_json(view: TenantView) -> dict[str, Any]:
    shown = _show_json(view)
    del shown["licenses"]
    return shown


def _tenant_reconcile(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    billing = read_billing(args.billing)

    async def job(config: Config, store: TenantStore) -> int:
        now = time.time()
        views = {
            record.tenant: tenant_view(record, config.policy, now)
            for record in await store.list_tenants()
        }
        drift = reconcile(billing, views, config.matrix)
        if args.json:
            print(msgspec.json.encode(drift).decode())
        else:
            for found in drift:
                print(
                    f"{found.tenant}: {found.field}: billing {found.billing}, store {found.store}"
                )
            tenants = len({found.tenant for found in drift})
            print(
                f"{len(billing)} billing rows, {len(views)} store tenants: "
                + (f"{len(drift)} differences in {tenants} tenants" if drift else "no drift")
            )
        return EXIT_INVALID if drift else EXIT_OK

    return run_on_store(config, job)


# -- migrate --------------------------------------------------------------------------------


def _migrate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.apply and args.signing_key is None:
        raise UsageError("--apply needs --signing-key (the issuing service is not supported yet)")
    if args.grandfather_tier is not None and args.grandfather_tier not in config.matrix.tiers:
        raise UsageError(
            f"unknown grandfather tier {args.grandfather_tier!r} "
            f"(known: {', '.join(config.matrix.tiers)})"
        )
    if args.days is not None and args.days <= 0:
        raise UsageError("--days must be at least 1")
    customers = migration.read_plan(args.plan, config.matrix, config.classic)
    signer: migration.Signer | None = None
    if args.apply:
        key, kid = load_signing_key(args.signing_key)

        def signer(claims: LicenseClaims) -> str:
            return sign_license(key, kid, claims)

    if args.dry_run and not _store_exists(config):
        import asyncio

        print("(no store to read yet: every customer is treated as new)")
        return asyncio.run(_run_migration(args, config, customers, None, None))
    return run_on_store(
        config, lambda config, store: _run_migration(args, config, customers, store, signer)
    )


def _store_exists(config: Config) -> bool:
    """A dry run reads the store but must not create it (SQLite creates its file on open)."""
    from gateway.store.sqlite import sqlite_path

    url = config.store_url
    if url.startswith("memory://"):
        return False
    if url.startswith("sqlite://"):
        path = sqlite_path(url)
        return path == ":memory:" or Path(path).exists()
    return True


async def _run_migration(
    args: argparse.Namespace,
    config: Config,
    customers: list[migration.Customer],
    store: TenantStore | None,
    signer: migration.Signer | None,
) -> int:
    now = int(time.time())
    today = now - now % migration.DAY
    steps: list[migration.Step] = []
    present: dict[str, int] = {}  # classic keys already in the store, per tenant
    for customer in customers:
        record = await store.get(customer.tenant) if store is not None else None
        start = args.start or migration.migration_start(record) or today
        exp = args.expires if args.expires is not None else start + args.days * migration.DAY
        if exp <= start:
            raise UsageError(f"{customer.tenant}: the license would end before it starts")
        plan = migration.plan_customer(
            customer, config.matrix, start=start, exp=exp, grandfather_tier=args.grandfather_tier
        )
        steps.append(migration.next_step(plan, record, now))
        present[customer.tenant] = (
            sum([await store.is_classic_key(key) for key in customer.classic_keys])
            if store is not None
            else 0
        )
    outcomes: dict[str, migration.Outcome] = {}
    if store is not None and signer is not None:
        tokens = migration.sign_steps(steps, signer, config.keyring, now)  # before any write
        for step in steps:
            if step.action != "conflict":
                tenant = step.plan.customer.tenant
                outcomes[tenant] = await migration.apply_step(step, tokens.get(tenant), store)
    for step in steps:
        _print_step(step, config.matrix, present, outcomes.get(step.plan.customer.tenant))
    return _print_summary(steps, present, outcomes, config, applied=signer is not None)


def _print_step(
    step: migration.Step,
    matrix: TierMatrix,
    present: dict[str, int],
    outcome: migration.Outcome | None,
) -> None:
    plan, customer = step.plan, step.plan.customer
    tier = matrix.tiers[customer.tier]
    price = " + ".join(
        [money(tier.price_usd_month) + "/mo"]
        + [matrix.addons[name].prices[tier.name] for name in customer.addons]
    )
    addons = f" + {', '.join(customer.addons)}" if customer.addons else ""
    print(f"{customer.tenant} (line {customer.line}): {step.action}: {step.why}")
    print(
        f"  new plan:    {tier.title}{addons}; {_seats(plan.seats_after)}; {price}; "
        f"{utc_day(plan.nbf)} .. {utc_day(plan.exp)}"
    )
    if plan.grandfather_tier is None:
        why = "no grandfather window" if customer.grandfather_days == 0 else "nothing to keep"
        print(f"  window:      none ({why}: the new plan applies from the start)")
    else:
        top = matrix.tiers[plan.grandfather_tier]
        until = utc_day(plan.grandfather_until)
        print(
            f"  until {until}: keeps {top.title} ({_seats(plan.seats_during)}), beyond the plan: "
            f"{feature_titles(matrix, plan.keeps) or 'nothing'}"
        )
        lost = [feature_titles(matrix, plan.keeps)] if plan.keeps else []
        if plan.seats_during != plan.seats_after:
            lost.append(f"seats {_seats(plan.seats_during)} -> {_seats(plan.seats_after)}")
        print(f"  from {until}: loses {'; '.join(lost) or 'nothing'}")
    keys = len(customer.classic_keys)
    if keys:
        have = present[customer.tenant]
        print(f"  classic keys: {keys} ({have} already imported, {keys - have} to import)")
    if outcome is not None:
        if outcome.error is not None:
            print(f"  FAILED:      {outcome.error}")
        else:
            done = []
            if outcome.license is not None:
                lic = outcome.license
                done.append(f"license {lic.claims.jti} stored (fingerprint {lic.fingerprint})")
            if outcome.classic_imported:
                done.append(f"{outcome.classic_imported} classic keys imported")
            print(f"  done:        {'; '.join(done) or 'nothing to write'}")


def _seats(seats: Seats) -> str:
    return f"{seats.ops_users} Operations users / {seats.drivers} drivers"


def _print_summary(
    steps: list[migration.Step],
    present: dict[str, int],
    outcomes: dict[str, migration.Outcome],
    config: Config,
    *,
    applied: bool,
) -> int:
    counts = {action: 0 for action in ("issue", "reissue", "unchanged", "conflict")}
    for step in steps:
        counts[step.action] += 1
    failed = [o for o in outcomes.values() if o.error is not None]
    to_import = sum(len(s.plan.customer.classic_keys) for s in steps) - sum(present.values())
    summary = (
        f"{len(steps)} customers: {counts['issue']} to issue, {counts['reissue']} to re-issue, "
        f"{counts['unchanged']} unchanged, {counts['conflict']} conflicts; "
        f"{to_import} classic keys to import"
    )
    if applied:
        summary += f"; applied, {len(failed)} failed"
    else:
        summary += " (dry run: nothing written)"
    print(summary)
    if config.settings.license.classic_keys != "store" and to_import:
        print(
            'note: license.classic_keys is "pattern": imported classic keys take effect once '
            'it is "store" (docs/licensing.md, Classic keys)'
        )
    return EXIT_INVALID if counts["conflict"] or failed else EXIT_OK
