"""``gateway issuer …``, ``gateway license issue`` and ``gateway revocations export``.

    gateway issuer serve --config issuer.toml
    gateway issuer dead-letters --config issuer.toml [--json]
    gateway issuer retry --config issuer.toml [--order ORDER_ID]
    gateway license issue --issuer-config issuer.toml --tenant acme --sku FLEET --sku SEAT-DRIVER:5
    gateway license issue --signing-key keys/k1.key --tenant acme --tier core --config gateway.toml
    gateway revocations export --signing-key keys/k1.key --config gateway.toml > revoked.jws

``license issue --issuer-config`` is the issuing service offline: the same SKU mapping, the
same active signing key, a serial from the same ledger, the same audit log.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.audit import os_user
from gateway.audit_cli import add_options, record, write
from gateway.issuing import BadOrder, Terms, build, issued_record, parse_when
from gateway.ledger import Ledger, serial_floor
from gateway.license import Seats, load_signing_key
from gateway.skus import (
    OrderRefused,
    Plan,
    SkuLine,
    catalog_of,
    check_grandfather,
    check_plan,
    resolve,
)

if TYPE_CHECKING:
    from gateway.issuer_config import IssuerConfig

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _date(text: str) -> int:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM[:SS]`` (UTC) or unix seconds → unix seconds."""
    try:
        return parse_when(text, "")
    except BadOrder as exc:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)") from exc


def _sku(text: str) -> SkuLine:
    name, _, quantity = text.partition(":")
    if quantity and not quantity.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected SKU or SKU:QUANTITY")
    return SkuLine(name, int(quantity) if quantity else 1)


def add_parsers(commands: Any) -> None:
    issuer = commands.add_parser("issuer", help="the issuing service").add_subparsers(
        dest="issuer_command", required=True, metavar="VERB"
    )
    serve = issuer.add_parser("serve", help="run the issuing service")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(handler=_serve)
    dead = issuer.add_parser("dead-letters", help="deliveries that gave up")
    dead.add_argument("--json", action="store_true")
    dead.set_defaults(handler=_dead_letters)
    retry = issuer.add_parser("retry", help="dead-lettered deliveries back to pending")
    retry.add_argument("--order", help="only this order's (default: all)")
    retry.set_defaults(handler=_retry)
    for parser in (serve, dead, retry):
        parser.add_argument("--config", type=Path, default=Path("issuer.toml"))

    revocations = commands.add_parser("revocations", help="signed revocation lists")
    verbs = revocations.add_subparsers(dest="revocations_command", required=True, metavar="VERB")
    export = verbs.add_parser("export", help="every revoked license id of a store, signed")
    _signer(export)
    export.add_argument("--config", type=Path, default=Path("gateway.toml"),
                        help="gateway.toml whose store holds the revocations")  # fmt: skip
    export.add_argument("--out", type=Path, help="write here (default: standard output)")
    add_options(export)
    export.set_defaults(handler=_export)


def _signer(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--signing-key", type=Path)
    who.add_argument("--issuer-config", type=Path, help="issuer.toml: its active key")


def add_issue_parser(lic: Any) -> None:
    """``license issue`` (under the ``license`` sub-command)."""
    issue = lic.add_parser("issue", help="sign a license key and print it")
    _signer(issue)
    issue.add_argument("--tenant", required=True, help="tenant id (custID)")
    plan = issue.add_mutually_exclusive_group(required=True)
    plan.add_argument("--tier")
    plan.add_argument("--sku", type=_sku, action="append", metavar="SKU[:N]",
                      help="a SKU of the matrix's [skus] (repeatable)")  # fmt: skip
    issue.add_argument("--addon", action="append", default=[], metavar="NAME")
    until = issue.add_mutually_exclusive_group()
    until.add_argument("--days", type=int, help="valid for N days (default 365)")
    until.add_argument("--expires", type=_date, metavar="DATE")
    issue.add_argument("--not-before", type=_date, metavar="DATE")
    issue.add_argument("--trial", action="store_true")
    issue.add_argument("--ops-users", type=int)
    issue.add_argument("--drivers", type=int)
    issue.add_argument("--serial", type=int, help="default: from the ledger, else the time in µs")
    issue.add_argument("--issuer", help="the iss claim (default: gateway-cli)")
    issue.add_argument("--expiry", choices=["restrict", "revoke", "maintain"])
    issue.add_argument("--grandfather-tier")
    issue.add_argument("--grandfather-until", type=_date, metavar="DATE")
    issue.add_argument(
        "--config",
        type=Path,
        help="gateway.toml whose matrix checks the plan (default: ./gateway.toml, unless "
        "--issuer-config gives the matrix)",
    )
    add_options(issue)
    issue.set_defaults(handler=_issue)


class _Sources:
    """Where ``license issue`` takes its key, matrix, SKUs, ledger and audit log from."""

    def __init__(self, args: argparse.Namespace) -> None:
        from gateway.cli import UsageError
        from gateway.config import load_config
        from gateway.tomlfile import TomlDocument

        self.issuer: IssuerConfig | None = None
        self.audit: Path | None = None
        if args.issuer_config is not None:
            from gateway.issuer_config import load_issuer_config
            from gateway.signing_keys import signing_key

            self.issuer = load_issuer_config(args.issuer_config)
            self.matrix, self.catalog = self.issuer.matrix, self.issuer.catalog
            self.audit = self.issuer.audit_path
            self.key, self.kid = signing_key(self.issuer.keys_dir)
            if args.serial is not None:
                raise UsageError(
                    "--serial cannot be used with --issuer-config (the ledger numbers)"
                )
            return
        self.key, self.kid = load_signing_key(args.signing_key)
        path = args.config or Path("gateway.toml")  # never sign a plan no matrix has checked
        if args.config is None and not path.is_file():
            raise UsageError(
                "no matrix to check the plan against: give --config gateway.toml "
                "(or --issuer-config issuer.toml)"
            )
        config = load_config(path)
        self.matrix = config.matrix
        self.catalog = catalog_of(
            TomlDocument.read(config.resolve(config.settings.files.tier_matrix))
        )
        if config.audit_log is not None:
            self.audit = config.audit_log


def _plan(args: argparse.Namespace, sources: _Sources) -> Plan:
    """The plan the flags describe, checked against the matrix (``UsageError`` if not sold)."""
    from gateway.cli import UsageError

    if (args.ops_users is None) != (args.drivers is None):
        raise UsageError("--ops-users and --drivers go together (they replace the tier's seats)")
    if (args.grandfather_tier is None) != (args.grandfather_until is None):
        raise UsageError("--grandfather-tier and --grandfather-until go together")
    try:
        if args.sku is not None:
            if args.addon:
                raise UsageError("--addon goes with --tier; with --sku the SKUs name the add-ons")
            plan = resolve(sources.catalog, sources.matrix, args.sku)
        else:
            check_plan(sources.matrix, args.tier, tuple(args.addon))
            plan = Plan(args.tier, tuple(args.addon), None, None)
        if args.grandfather_tier is not None:
            check_grandfather(sources.matrix, plan.tier, args.grandfather_tier)
    except OrderRefused as exc:
        sku = f"SKU {exc.sku!r} refused ({exc.rule}): " if exc.sku else ""
        raise UsageError(sku + exc.detail) from exc
    if args.ops_users is not None:
        plan = msgspec.structs.replace(plan, seats=Seats(args.ops_users, args.drivers))
    if args.days is not None or args.trial:  # an explicit --days, or a trial, beats a SKU's term
        plan = msgspec.structs.replace(plan, days=None)
    return plan


def _issue(args: argparse.Namespace) -> int:
    from gateway.cli import UsageError

    sources = _Sources(args)
    plan = _plan(args, sources)
    if sources.issuer is not None:
        settings = sources.issuer.settings.issuer
        default_days = settings.trial_days if args.trial else settings.default_days
        issuer_name = args.issuer or settings.name
    else:
        default_days, issuer_name = 365, args.issuer or "gateway-cli"
    terms = Terms(
        tenant=args.tenant,
        plan=plan,
        issuer=issuer_name,
        actor=args.actor or os_user(),
        now=int(time.time()),
        starts_at=args.not_before,
        ends_at=args.expires,
        days=args.days if args.days is not None else default_days,
        trial=args.trial,
        expiry=args.expiry,
        grandfather_tier=args.grandfather_tier,
        grandfather_until=args.grandfather_until,
    )
    key, kid, matrix = sources.key, sources.kid, sources.matrix
    try:
        if sources.issuer is not None:
            lic, _ = Ledger(sources.issuer.ledger_path).mint(
                args.tenant,
                lambda serial, held: build(terms, matrix, serial, held, key, kid),
                lambda minted: write(args, sources.audit, issued_record(minted, args.reason)),
            )
            print(f"serial {lic.serial}, {lic.change}, license id {lic.license_id}",
                  file=sys.stderr)  # fmt: skip
        else:
            serial = args.serial if args.serial is not None else serial_floor(time.time())
            lic = build(terms, matrix, serial, (), key, kid)
            write(args, sources.audit, issued_record(lic, args.reason))
    except BadOrder as exc:
        raise UsageError(exc.detail) from exc
    print(lic.token)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    import logging

    from gateway.issuer import serve
    from gateway.issuer_config import load_issuer_config

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(load_issuer_config(args.config))
    return EXIT_OK


def _ledger(args: argparse.Namespace) -> Ledger:
    from gateway.issuer_config import load_issuer_config

    return Ledger(load_issuer_config(args.config).ledger_path)


def _dead_letters(args: argparse.Namespace) -> int:
    dead = _ledger(args).deliveries("dead")
    if args.json:
        print(msgspec.json.encode(dead).decode())
        return EXIT_OK
    for delivery in dead:
        print(f"{delivery.license_id}  {delivery.target:16} {delivery.attempts} attempts: "
              f"{delivery.last_error}")  # fmt: skip
    print(f"{len(dead)} dead-lettered deliveries")
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    license_id = None
    if args.order is not None:
        found = ledger.order(args.order)
        if found is None:
            print(f"gateway: no order {args.order!r} in {ledger.path}", file=sys.stderr)
            return EXIT_INVALID
        license_id = found[0].license_id
    count = ledger.retry(license_id)
    print(f"{count} deliveries back to pending (the running issuer attempts them shortly)")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.config import load_config
    from gateway.revocations import sign_list
    from gateway.signing_keys import signing_key, write_atomically
    from gateway.store import open_store

    if args.issuer_config is not None:
        from gateway.issuer_config import load_issuer_config

        key, kid = signing_key(load_issuer_config(args.issuer_config).keys_dir)
    else:
        key, kid = load_signing_key(args.signing_key)
    config = load_config(args.config)

    async def collect() -> dict[str, list[str]]:
        store = open_store(config.store_url, config.keyring)
        try:
            revoked: dict[str, list[str]] = {}
            for tenant in await store.tenants():
                found = await store.get(tenant)
                if found is not None and found.revoked:
                    revoked[tenant] = sorted(found.revoked)
            return revoked
        finally:
            await store.close()

    revoked = asyncio.run(collect())
    token = sign_list(key, kid, revoked, issuer="gateway-cli", now=time.time())
    count = sum(len(ids) for ids in revoked.values())
    configured = config.audit_log
    record(args, configured, action="revocations_export", kid=kid,
           detail={"revoked": count, "tenants": len(revoked),
                   "out": str(args.out) if args.out else "stdout"})  # fmt: skip
    if args.out is not None:
        write_atomically(args.out, token.encode() + b"\n")
    else:
        print(token)
    print(f"{count} revoked license ids of {len(revoked)} tenants, signed with kid {kid}",
          file=sys.stderr)  # fmt: skip
    return EXIT_OK
