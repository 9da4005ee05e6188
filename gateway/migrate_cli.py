"""``gateway migrate``: classic customers to the new tiers, from a plan file.

    gateway migrate --plan customers.csv --config gateway.toml --dry-run [--issuer URL ...]
    gateway migrate --plan customers.csv --config gateway.toml --apply --signing-key K
    gateway migrate --plan customers.csv --config gateway.toml --apply \\
        --issuer http://issuer:9800 --billing-secret-env ISSUER_BILLING_SECRET

With ``--signing-key`` every license is signed here and stored into the store of
gateway.toml; with ``--issuer`` each customer is an order to the issuing service (which
mints it and delivers it to its targets). Either way the classic keys are imported into the
store of gateway.toml here, and each change is recorded in the audit log first
(``--audit-log``, else ``[audit] log``). The plan logic is ``gateway.migration``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import msgspec

from gateway import migration
from gateway.audit import AuditRecord, os_user
from gateway.audit_cli import add_options, audit_log
from gateway.cli import EXIT_INVALID, EXIT_OK, UsageError, _date, run_on_store
from gateway.config import Config, load_config
from gateway.csvrows import utc_day
from gateway.decision import TenantRecord
from gateway.docs import feature_titles, money
from gateway.issuer_client import IssuerClient, IssuerError
from gateway.issuing import Order
from gateway.license import License, LicenseClaims, Seats, load_signing_key, sign_license
from gateway.matrix import TierMatrix
from gateway.skus import OrderRefused, SkuCatalog, catalog_of, skus_for
from gateway.store import TenantStore
from gateway.tomlfile import TomlDocument


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser("migrate", help="move classic customers to the new tiers")
    migrate.set_defaults(handler=_migrate)
    migrate.add_argument("--plan", type=Path, required=True, metavar="CSV")
    migrate.add_argument("--config", type=Path, default=Path("gateway.toml"))
    mode = migrate.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="report only; nothing is written")
    mode.add_argument("--apply", action="store_true", help="issue, store and import")
    source = migrate.add_mutually_exclusive_group()
    source.add_argument("--signing-key", type=Path, help="sign here with this private key")
    source.add_argument("--issuer", metavar="URL", help="order from the issuing service")
    migrate.add_argument(
        "--billing-secret-env", metavar="VAR", help="with --issuer: the environment variable "
        "holding a billing secret of the issuer's [[billing]] keys"
    )  # fmt: skip
    migrate.add_argument(
        "--start", type=_date, metavar="DATE", help="migration day (default: today, or the day "
        "of the customer's earlier migration)"
    )  # fmt: skip
    term = migrate.add_mutually_exclusive_group()
    term.add_argument("--days", type=int, default=migration.DEFAULT_TERM_DAYS)
    term.add_argument("--expires", type=_date, metavar="DATE")
    migrate.add_argument("--grandfather-tier", help="the window's tier (default: the top tier)")
    add_options(migrate)


class _Run:
    """What one run works with: the config, the plan's customers, how licenses are made."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = load_config(args.config)
        config = self.config
        if args.apply and args.signing_key is None and args.issuer is None:
            raise UsageError("--apply needs --signing-key or --issuer URL")
        if args.grandfather_tier is not None and args.grandfather_tier not in config.matrix.tiers:
            raise UsageError(
                f"unknown grandfather tier {args.grandfather_tier!r} "
                f"(known: {', '.join(config.matrix.tiers)})"
            )
        if args.days is not None and args.days <= 0:
            raise UsageError("--days must be at least 1")
        self.secret = _billing_secret(args)
        self.customers = migration.read_plan(args.plan, config.matrix, config.classic)
        self.signer: migration.Signer | None = None
        if args.apply and args.signing_key is not None:
            key, kid = load_signing_key(args.signing_key)

            def signer(claims: LicenseClaims) -> str:
                return sign_license(key, kid, claims)

            self.signer = signer
        # With --issuer, the SKUs of the gateway's matrix say what can be ordered.
        self.catalog: SkuCatalog | None = None
        if args.issuer is not None:
            path = config.resolve(config.settings.files.tier_matrix)
            self.catalog = catalog_of(TomlDocument.read(path))
        configured = config.audit_log
        self.audit = audit_log(args, configured)
        self.actor = args.actor or os_user()

    @property
    def writes(self) -> bool:
        return bool(self.args.apply)

    @asynccontextmanager
    async def issuer(self) -> AsyncIterator[IssuerClient | None]:
        if self.args.issuer is None or self.secret is None:
            yield None
            return
        async with aiohttp.ClientSession() as session:
            yield IssuerClient(self.args.issuer, self.secret, session)

    async def record(self, line: AuditRecord) -> None:
        if self.audit is not None:
            await asyncio.to_thread(self.audit.append, line)


def _billing_secret(args: argparse.Namespace) -> bytes | None:
    if args.issuer is None:
        if args.billing_secret_env is not None:
            raise UsageError("--billing-secret-env goes with --issuer")
        return None
    if not args.issuer.startswith(("http://", "https://")):
        raise UsageError(f"--issuer {args.issuer!r}: expected http(s)://host:port")
    if args.billing_secret_env is None:
        raise UsageError("--issuer needs --billing-secret-env VAR (the orders are signed)")
    secret = os.environ.get(args.billing_secret_env, "")
    if not secret:
        raise UsageError(f"${args.billing_secret_env} is not set (or empty)")
    return secret.encode()


def _migrate(args: argparse.Namespace) -> int:
    run = _Run(args)
    if run.writes and run.audit is None:
        print(
            "gateway: note: the migration is not recorded in an audit log "
            "(give --audit-log or set [audit] log)",
            file=sys.stderr,
        )
    if args.dry_run and not _store_exists(run.config):
        print("(no store to read yet: every customer is treated as new)")
        return asyncio.run(_run_migration(run, None))
    return run_on_store(run.config, lambda config, store: _run_migration(run, store))


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


async def _migrated(record: TenantRecord | None, issuer: IssuerClient | None) -> frozenset[str]:
    """The tenant's newest license id when the issuing service minted it for a migration
    order (a re-run after ``--issuer`` must recognise its own licenses)."""
    newest = migration.newest_license(record)
    if issuer is None or newest is None or newest.claims.iss == migration.ISSUER:
        return frozenset()
    found = await issuer.license(newest.claims.jti)
    order_id = found.get("order_id") if found else None
    if isinstance(order_id, str) and order_id.startswith(migration.ORDER_PREFIX):
        return frozenset({newest.claims.jti})
    return frozenset()


async def _run_migration(run: _Run, store: TenantStore | None) -> int:
    try:
        async with run.issuer() as issuer:
            return await _migration(run, store, issuer)
    except IssuerError as exc:  # reading what the issuer minted before: nothing written yet
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_INVALID


async def _migration(run: _Run, store: TenantStore | None, issuer: IssuerClient | None) -> int:
    args, config = run.args, run.config
    now = int(time.time())
    today = now - now % migration.DAY
    steps: list[migration.Step] = []
    orders: dict[str, Order] = {}
    present: dict[str, int] = {}  # classic keys already in the store, per tenant
    for customer in run.customers:
        record = await store.get(customer.tenant) if store is not None else None
        migrated = await _migrated(record, issuer)
        start = args.start or migration.migration_start(record, migrated) or today
        exp = args.expires if args.expires is not None else start + args.days * migration.DAY
        if exp <= start:
            raise UsageError(f"{customer.tenant}: the license would end before it starts")
        plan = migration.plan_customer(
            customer, config.matrix, start=start, exp=exp, grandfather_tier=args.grandfather_tier
        )
        step = migration.next_step(plan, record, now, migrated)
        if run.catalog is not None and step.action in ("issue", "reissue"):
            try:
                skus = skus_for(run.catalog, config.matrix, customer.tier, customer.addons)
            except OrderRefused as exc:
                step = msgspec.structs.replace(
                    step, action="refused", why=f"not migratable: {exc.detail}"
                )
            else:
                revoked = record.revoked if record is not None else frozenset()
                orders[customer.tenant] = migration.order_for(step, skus, revoked)
        steps.append(step)
        present[customer.tenant] = (
            sum([await store.is_classic_key(key) for key in customer.classic_keys])
            if store is not None
            else 0
        )
    outcomes: dict[str, migration.Outcome] = {}
    if store is not None and run.writes:
        outcomes = await _apply(run, steps, orders, store, issuer, now)
    for step in steps:
        tenant = step.plan.customer.tenant
        _print_step(step, config.matrix, present, orders.get(tenant), outcomes.get(tenant))
    return _print_summary(steps, present, outcomes, config, applied=run.writes)


async def _apply(
    run: _Run,
    steps: list[migration.Step],
    orders: dict[str, Order],
    store: TenantStore,
    issuer: IssuerClient | None,
    now: int,
) -> dict[str, migration.Outcome]:
    signed: dict[str, tuple[str, License]] = {}
    if run.signer is not None:  # before any write: a key the gateways distrust stops the run
        signed = migration.sign_steps(steps, run.signer, run.config.keyring, now)
    outcomes: dict[str, migration.Outcome] = {}
    for step in steps:
        tenant = step.plan.customer.tenant
        if step.action in ("conflict", "refused"):
            continue
        issue: migration.IssueLicense | None = None
        token, verified = signed.get(tenant) or (None, None)
        order = orders.get(tenant)
        if token is not None:
            issue = migration.store_license(store, token)
        elif issuer is not None and order is not None:
            issue = _order_license(issuer, order)
        line = migration.audit_line(
            step, actor=run.actor, reason=run.args.reason, signed=verified, order=order
        )
        outcomes[tenant] = await migration.apply_step(step, issue, line, store, run.record)
    return outcomes


def _order_license(issuer: IssuerClient, order: Order) -> migration.IssueLicense:
    async def place() -> migration.Issued:
        try:
            answer = await issuer.place(order)
        except IssuerError as exc:
            if exc.status is None or exc.status >= 500:
                raise migration.NotIssued(
                    f"{exc} (if it minted the license meanwhile, a re-run places the same "
                    "order and completes this customer)"
                ) from exc
            raise migration.NotIssued(str(exc)) from exc
        states = ", ".join(
            f"{d.get('target')} {d.get('state')}" for d in answer.get("deliveries", [])
        )
        return migration.Issued(
            str(answer.get("license_id")),
            str(answer.get("fingerprint")),
            f"ordered ({order.order_id}); delivery: {states or 'no targets'}",
        )

    return place


def _print_step(
    step: migration.Step,
    matrix: TierMatrix,
    present: dict[str, int],
    order: Order | None,
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
    if order is not None:
        skus = " + ".join(line.sku for line in order.lines())
        print(f"  order:       {skus} ({order.order_id})")
    keys = len(customer.classic_keys)
    if keys:
        have = present[customer.tenant]
        print(f"  classic keys: {keys} ({have} already imported, {keys - have} to import)")
    if outcome is not None:
        if outcome.error is not None:
            print(f"  FAILED:      {outcome.error}")
        else:
            done = []
            if outcome.issued is not None:
                issued = outcome.issued
                done.append(
                    f"license {issued.license_id} (fingerprint {issued.fingerprint}) {issued.how}"
                )
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
    counts = {action: 0 for action in ("issue", "reissue", "unchanged", "conflict", "refused")}
    for step in steps:
        counts[step.action] += 1
    failed = [o for o in outcomes.values() if o.error is not None]
    to_import = sum(len(s.plan.customer.classic_keys) for s in steps) - sum(present.values())
    summary = (
        f"{len(steps)} customers: {counts['issue']} to issue, {counts['reissue']} to re-issue, "
        f"{counts['unchanged']} unchanged, {counts['conflict']} conflicts"
    )
    if counts["refused"]:
        summary += f", {counts['refused']} not migratable"
    summary += f"; {to_import} classic keys to import"
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
    return EXIT_INVALID if counts["conflict"] or counts["refused"] or failed else EXIT_OK
