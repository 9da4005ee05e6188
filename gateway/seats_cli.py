"""The seat and usage verbs of the ``gateway`` command (README "Seats and usage").

    gateway tenant seats acme [--kind ops_users] [--json]    # holders with last-seen times
    gateway tenant seats acme --release alice [--kind ...]   # free one user's seat
    gateway usage report --tenant acme --since 2024-05-01 [--until DATE]
        [--by feature|client|day] [--format table|csv|json]

They act on the store ``gateway.toml`` names (``--config``), like the other tenant verbs.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any, get_args

import msgspec

from gateway import audit_cli
from gateway.cli import EXIT_OK, UsageError, _date, _iso, run_on_store
from gateway.config import Config, load_config
from gateway.decision import current_license, effective_plan
from gateway.seats import seat_limits
from gateway.store import SeatKind, TenantStore
from gateway.usage import Grouping, report

SEAT_KIND_NAMES: tuple[SeatKind, ...] = get_args(SeatKind)


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    tenant: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``tenant seats`` under the ``tenant`` verbs, and the ``usage`` command."""
    seats = tenant.add_parser("seats", help="seat holders (active_users mode); --release one")
    seats.add_argument("tenant_id")
    seats.add_argument("--kind", choices=SEAT_KIND_NAMES, help="one seat kind (default: both)")
    seats.add_argument("--release", metavar="USER", help="free this user's seat")
    seats.add_argument("--json", action="store_true")
    seats.add_argument("--config", type=Path, default=Path("gateway.toml"))
    audit_cli.add_options(seats)  # a --release is a seat change: audited
    seats.set_defaults(handler=tenant_seats)

    usage = commands.add_parser("usage", help="calls metered per tenant").add_subparsers(
        dest="usage_command", required=True, metavar="VERB"
    )
    usage_report = usage.add_parser("report", help="a tenant's allowed calls since a date")
    usage_report.add_argument("--tenant", required=True)
    usage_report.add_argument("--since", type=_date, required=True, metavar="DATE")
    usage_report.add_argument("--until", type=_date, metavar="DATE")
    usage_report.add_argument("--by", choices=get_args(Grouping), default="feature")
    usage_report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage_report.add_argument("--config", type=Path, default=Path("gateway.toml"))
    usage_report.set_defaults(handler=usage_report_verb)


# -- gateway tenant seats -------------------------------------------------------------------


def tenant_seats(args: argparse.Namespace) -> int:
    kinds = (args.kind,) if args.kind else SEAT_KIND_NAMES
    if args.release is not None:
        return run_on_store(
            load_config(args.config), lambda config, store: _release(config, store, args, kinds)
        )
    return run_on_store(
        load_config(args.config), lambda config, store: _list(config, store, args, kinds)
    )


async def _release(
    config: Config, store: TenantStore, args: argparse.Namespace, kinds: tuple[SeatKind, ...]
) -> int:
    released = [
        kind for kind in kinds if await store.release_seat(args.tenant_id, kind, args.release)
    ]
    if released:
        audit_cli.record(
            args,
            config.audit_log,
            action="seat_change",
            tenant=args.tenant_id,
            detail={"released": args.release, "seats": released},
        )
        print(f"{args.tenant_id}: released {args.release} ({', '.join(released)})")
    else:
        print(f"{args.tenant_id}: {args.release} holds no seat: no change")
    return EXIT_OK


async def _list(
    config: Config, store: TenantStore, args: argparse.Namespace, kinds: tuple[SeatKind, ...]
) -> int:
    settings = config.settings.seats
    window = settings.window_days * 86400.0
    now = time.time()
    record = await store.get(args.tenant_id)
    extra = await store.extra_seats(args.tenant_id)
    plan = None
    lic = current_license(None, record, now, config.settings.license.clock_skew_seconds)
    if lic is not None and lic.claims.tier in config.matrix.tiers:
        granted = effective_plan(config.policy, lic.claims, now)
        plan = (granted.tier, granted.seats) if granted is not None else None
    report_: dict[str, Any] = {
        "tenant": args.tenant_id,
        "mode": settings.mode,
        "window_days": settings.window_days,
        "extra": msgspec.to_builtins(extra),
        "seats": {},
    }
    for kind in kinds:
        holders = await store.seat_holders(args.tenant_id, kind, now, window)
        entry: dict[str, Any] = {"used": len(holders), "included": None, "allowance": None}
        if plan is not None:
            limits = seat_limits(config.matrix, settings, plan[0], kind, plan[1], extra)
            entry.update(tier=limits.tier, included=limits.included, allowance=limits.allowance)
        entry["holders"] = [
            {
                "user": holder.user,
                "last_seen": holder.last_seen,
                "last_seen_utc": _iso(holder.last_seen),
            }
            for holder in holders
        ]
        report_["seats"][kind] = entry
    if args.json:
        print(msgspec.json.encode(report_).decode())
        return EXIT_OK
    print(f"tenant: {args.tenant_id}  (mode {settings.mode}, window {settings.window_days} days)")
    for kind, entry in report_["seats"].items():
        limits_text = (
            f", {entry['included']} included, {entry['allowance']} allowed"
            if entry["included"] is not None
            else " (no license in the store)"
        )
        print(f"{kind}: {entry['used']} in use{limits_text}")
        for holder in entry["holders"]:
            print(f"  {holder['user']:32} last seen {holder['last_seen_utc']}")
    return EXIT_OK


# -- gateway usage report -------------------------------------------------------------------


def usage_report_verb(args: argparse.Namespace) -> int:
    if args.until is not None and args.until <= args.since:
        raise UsageError("--until must be after --since")

    async def job(_: Config, store: TenantStore) -> int:
        counts = await store.usage(args.tenant, args.since, args.until)
        rows = report(counts, args.by)
        _print_usage(args, rows)
        return EXIT_OK

    return run_on_store(load_config(args.config), job)


def _print_usage(args: argparse.Namespace, rows: list[tuple[str, int]]) -> None:
    total = sum(calls for _, calls in rows)
    if args.format == "json":
        document = {
            "tenant": args.tenant,
            "since": _iso(args.since),
            "until": _iso(args.until) if args.until is not None else None,
            "by": args.by,
            "rows": [{args.by: key, "calls": calls} for key, calls in rows],
            "total": total,
        }
        print(msgspec.json.encode(document).decode())
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([args.by, "calls"])
        writer.writerows(rows)
    else:
        width = max([len(args.by), len("total"), *(len(key) for key, _ in rows)])
        print(f"{args.by:{width}}  {'calls':>10}")
        for key, calls in rows:
            print(f"{key:{width}}  {calls:>10}")
        print(f"{'total':{width}}  {total:>10}")
