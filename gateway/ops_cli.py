"""Command-line verbs for Sales, Billing and Support: generated documents, tenant views,
reconciliation with billing, and the migration of classic customers.

    gateway docs plans --out docs/plans.md [--check]
    gateway docs kb --out docs/kb/plans-and-limits.md [--check]
    gateway tenant show acme [--json]
    gateway tenant list [--json]
    gateway tenant reconcile --billing export.csv [--json]
    gateway migrate ...                              (gateway.migrate_cli)

Registered from ``gateway.cli`` by ``add_parsers``; each verb's parser carries its handler.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from gateway import migrate_cli, migration
from gateway.cli import EXIT_INVALID, EXIT_OK, UsageError, _iso, run_on_store
from gateway.config import Config, LicenseSettings, load_config
from gateway.csvrows import utc_day
from gateway.docs import fill_blocks, kb_blocks, plans_markdown
from gateway.matrix import load_matrix
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

    migrate_cli.add_parser(commands)


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
