"""The ``gateway`` command: check configs, manage keys, issue and inspect licenses, explain.

Exit codes: 0 success, 1 the thing checked is invalid (or a command failed), 2 usage error.

    gateway check --config gateway.toml
    gateway keys generate --out keys/ --kid dev
    gateway license issue --signing-key keys/dev.key --tenant acme --tier fleet --days 365
    gateway license inspect "$KEY" --public-keys keys/
    gateway explain --app operations POST /api/v1/shipments/1/optimize --tier core
    gateway routes coverage|export ... / gateway test ...   (gateway.routes_cli)
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway import (
    __version__,
    audit_cli,
    explain_cli,
    issuer_cli,
    keys_cli,
    replay_cli,
    report_cli,
    routes_cli,
)
from gateway.config import Config, config_warnings, load_config
from gateway.decision import expiry_state, not_yet_valid
from gateway.errors import ConfigError, LicenseError
from gateway.license import (
    ClassicKeys,
    KeyRing,
    decode_unverified,
    fingerprint,
    generate_keypair,
)

if TYPE_CHECKING:
    from gateway.store import TenantStore

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line that parses but cannot be carried out as given (exit 2)."""


# The one date syntax of every verb (YYYY-MM-DD[THH:MM[:SS]] UTC, or unix seconds).
_date = issuer_cli._date


def _iso(ts: int | float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate gateway.toml and the files it names")
    check.add_argument("--config", type=Path, default=Path("gateway.toml"))
    check.add_argument("--strict", action="store_true", help="warnings are errors (exit 1)")

    keys = commands.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True, metavar="VERB"
    )
    generate = keys.add_parser("generate", help="new Ed25519 key pair: <kid>.key and <kid>.pub")
    generate.add_argument("--out", type=Path, required=True, help="folder to write into")
    generate.add_argument("--kid", help="key id (default: k<YYYYMMDD>-<random>)")
    keys_cli.add_parsers(keys)

    lic = commands.add_parser("license", help="license keys").add_subparsers(
        dest="license_command", required=True, metavar="VERB"
    )
    issuer_cli.add_issue_parser(lic)
    inspect = lic.add_parser("inspect", help="show a key's claims and validity")
    inspect.add_argument("key")
    inspect.add_argument("--public-keys", type=Path, help="folder of <kid>.pub to verify with")
    inspect.add_argument("--grace-days", type=int, default=7)
    inspect.add_argument("--json", action="store_true")

    tenant = commands.add_parser("tenant", help="the tenant store").add_subparsers(
        dest="tenant_command", required=True, metavar="VERB"
    )
    imported = tenant.add_parser("import", help="tenants and keys in bulk from a tenants file")
    imported.add_argument("file", type=Path)
    for verb, what in (("suspend", "suspend a tenant"), ("reinstate", "lift a suspension")):
        tenant.add_parser(verb, help=what).add_argument("tenant_id")
    usage = tenant.add_parser("usage", help="record the seats in use (seat limits apply)")
    usage.add_argument("tenant_id")
    usage.add_argument("--ops-users", type=int, required=True)
    usage.add_argument("--drivers", type=int, required=True)
    revoke = tenant.add_parser("revoke", help="revoke one license id")
    revoke.add_argument("tenant_id")
    revoke.add_argument("license_id")
    for verb_parser in (
        imported,
        *(tenant.choices[v] for v in ("suspend", "reinstate")),
        usage,
        revoke,
    ):
        verb_parser.add_argument("--config", type=Path, default=Path("gateway.toml"))
    from gateway import seats_cli  # here, not at the top: it imports this module

    seats_cli.add_parsers(commands, tenant)
    for verb in ("suspend", "reinstate", "usage", "revoke"):
        audit_cli.add_options(tenant.choices[verb])

    serve = commands.add_parser("serve", help="run the gateway (listeners + admin)")
    serve.add_argument("--config", type=Path, default=Path("gateway.toml"))
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the listeners"
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    explain_cli.add_parsers(commands)
    report_cli.add_parsers(commands)
    replay_cli.add_parsers(commands)
    routes_cli.add_parsers(commands)

    from gateway import ops_cli  # here, not at the top: ops_cli imports this module

    ops_cli.add_parsers(commands, tenant)
    issuer_cli.add_parsers(commands)
    audit_cli.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "check": _check,
        "keys": _keys_generate,
        "license": _inspect,
        "serve": _serve,
        "tenant": _tenant,
        "report": report_cli.run,
        **routes_cli.HANDLERS,
        "replay": replay_cli.run,
    }
    handler = getattr(args, "handler", None) or handlers[args.command]  # verbs of other modules
    try:
        return int(handler(args))
    except ConfigError as exc:
        print(f"gateway: configuration invalid ({len(exc.problems)} problems):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_INVALID
    except UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _tenant(args: argparse.Namespace) -> int:
    return run_on_store(
        load_config(args.config), lambda config, store: _tenant_verb(args, config, store)
    )


def run_on_store(config: Config, job: Callable[[Config, TenantStore], Awaitable[int]]) -> int:
    """Run ``job`` on the tenant store of ``config`` (never ``memory://``, which lives inside
    the gateway process); a store failure is exit 1 with its message."""
    import asyncio

    from gateway.store import StoreError, open_store, per_process

    url = config.store_url
    if per_process(url):
        raise UsageError(
            f"store.url is {url}: that store lives inside the gateway process; "
            "configure sqlite:///path or redis://host:port/db to manage tenants"
        )

    async def run() -> int:
        store = open_store(url, config.keyring)
        try:
            return await job(config, store)
        except StoreError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return EXIT_INVALID
        finally:
            await store.close()

    return asyncio.run(run())


async def _tenant_verb(args: argparse.Namespace, config: Config, store: Any) -> int:
    from gateway.store.seed import import_tenants, read_tenants

    verb = args.tenant_command
    if verb == "import":
        tenants = read_tenants(args.file)

        def progress(done: int, total: int) -> None:
            if done == total or done % 100 == 0:
                print(f"\rimported {done}/{total} tenants", end="", file=sys.stderr, flush=True)

        result = await import_tenants(store, tenants, progress)
        print(file=sys.stderr)
        for problem in result.problems:
            print(f"  {problem}", file=sys.stderr)
        print(
            f"{result.tenants} tenants, {result.keys_stored} keys stored, "
            f"{result.keys_unchanged} already present, {len(result.problems)} problems"
        )
        return EXIT_INVALID if result.problems else EXIT_OK
    audit_log = config.audit_log
    if verb in ("suspend", "reinstate"):
        changed = await store.set_suspended(args.tenant_id, verb == "suspend")
        if changed:
            audit_cli.record(args, audit_log, action=verb, tenant=args.tenant_id)
        done = "suspended" if verb == "suspend" else "reinstated"
        print(f"{args.tenant_id}: {done}" if changed else f"{args.tenant_id}: no change")
        return EXIT_OK
    if verb == "usage":
        await store.set_usage(args.tenant_id, args.ops_users, args.drivers)
        audit_cli.record(args, audit_log, action="seat_change", tenant=args.tenant_id,
                         detail={"ops_users": args.ops_users, "drivers": args.drivers})  # fmt: skip
        print(f"{args.tenant_id}: {args.ops_users} ops users, {args.drivers} drivers in use")
        return EXIT_OK
    if verb == "revoke":
        changed = await store.revoke(args.tenant_id, args.license_id)
        if changed:
            audit_cli.record(args, audit_log, action="revoke", tenant=args.tenant_id,
                             license_id=args.license_id)  # fmt: skip
        print(f"{args.tenant_id}: {args.license_id} revoked" if changed else "no change")
        return EXIT_OK
    raise UsageError(f"unknown tenant verb {verb!r}")


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import uvloop

    from gateway.runtime import Runtime

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.workers > 1:
        from gateway.runtime import ParserError
        from gateway.supervisor import supervise

        try:
            return supervise(args.config, args.workers, args.log_level)
        except ParserError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return EXIT_INVALID

    async def run() -> None:
        runtime = Runtime(load_config(args.config), reuse_port=args.reuse_port)
        await runtime.start()
        runtime.install_signal_handlers()
        await runtime.wait_closed()

    from gateway.runtime import ParserError

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run())
    except ParserError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from gateway.issuer_config import is_issuer_config, load_issuer_config
    from gateway.revocations import check_config

    if is_issuer_config(args.config):
        issuer = load_issuer_config(args.config)
        print(f"{args.config}: OK (issuer: {len(issuer.catalog)} SKUs, "
              f"{len(issuer.settings.targets)} delivery targets)")  # fmt: skip
        return EXIT_OK
    config = load_config(args.config)
    problems = check_config(config)
    if problems:
        raise ConfigError(problems)
    warnings = config_warnings(config)
    failed = args.strict and warnings
    print(f"{args.config}: {'FAILED (--strict: warnings are errors)' if failed else 'OK'}")
    routes = sum(1 for _ in config.routes.routes())
    print(f"  routes.toml       {routes} routes, revision {config.routes.sha}")
    print(
        f"  tier_matrix.toml  {len(config.matrix.features)} features, "
        f"{len(config.matrix.tiers)} tiers, {len(config.matrix.addons)} add-ons, "
        f"revision {config.matrix.sha}"
    )
    print(f"  public keys       {len(config.keyring.keys)} ({', '.join(config.keyring.keys)})")
    rollout, candidate = config.rollout, config.settings.candidate
    cohort = f"; {len(rollout.cohort)} tenants enforced on shadow apps" if rollout.cohort else ""
    print(f"  enforce           {rollout.describe()}{cohort}")
    if rollout.candidate is not None:
        files = ", ".join(f for f in (candidate.routes, candidate.tier_matrix) if f is not None)
        print(f"  candidate         {files}, revision {rollout.candidate.revision}")
    if config.settings.audit.log is None:
        print("  note: no [audit] log: provisioning calls are not recorded in an audit trail")
    for warning in warnings:
        print(f"  {'error' if failed else 'warning'}: {warning}")
    return EXIT_INVALID if failed else EXIT_OK


def _keys_generate(args: argparse.Namespace) -> int:
    kid = args.kid or f"k{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:6]}"
    private_path, public_path = generate_keypair(args.out, kid)
    print(f"private key: {private_path} (mode 0600; keep it with the issuing tool only)")
    print(f"public key:  {public_path} (copy into the gateway's license.public_keys folder)")
    print(f"kid:         {kid}")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    token = args.key.strip()
    report: dict[str, Any] = {"fingerprint": fingerprint(token)}
    try:
        header, claims_raw = decode_unverified(token)
    except LicenseError as exc:
        if ClassicKeys().is_classic(token):
            report.update(valid=None, reason="classic", detail="classic X Dispatch key")
        else:
            report.update(valid=False, reason=exc.reason, detail=exc.detail)
        return _print_report(report, args.json, EXIT_INVALID if report["valid"] is False else 0)
    report.update(header=header, claims=claims_raw)
    if args.public_keys is None:
        report.update(valid=None, reason="unverified", detail="no --public-keys given")
        return _print_report(report, args.json, EXIT_OK)
    try:
        lic = KeyRing.load(args.public_keys).verify(token)
    except LicenseError as exc:
        report.update(valid=False, reason=exc.reason, detail=exc.detail)
        return _print_report(report, args.json, EXIT_INVALID)
    now = time.time()
    early = not_yet_valid(lic.claims, now, 300)
    if early is not None:
        report.update(valid=False, reason="license_not_yet_valid", detail=early)
        return _print_report(report, args.json, EXIT_INVALID)
    state, warning = expiry_state(lic.claims, now, args.grace_days * 86400)
    if state == "expired":
        report.update(
            valid=False, reason="license_expired", detail=f"expired {_iso(lic.claims.exp)}"
        )
        return _print_report(report, args.json, EXIT_INVALID)
    report.update(valid=True, reason=state, detail=warning or f"valid until {_iso(lic.claims.exp)}")
    return _print_report(report, args.json, EXIT_OK)


def _print_report(report: dict[str, Any], as_json: bool, code: int) -> int:
    if as_json:
        print(msgspec.json.encode(report).decode())
        return code
    validity = {True: "VALID", False: "INVALID", None: "NOT VERIFIED"}[report["valid"]]
    print(f"{validity}: {report['reason']} - {report['detail']}")
    print(f"fingerprint: {report['fingerprint']}")
    if "header" in report:
        print(f"kid: {report['header'].get('kid')}  alg: {report['header'].get('alg')}")
    for name, value in report.get("claims", {}).items():
        shown = (
            _iso(value)
            if name in ("iat", "nbf", "exp", "grandfather_until") and isinstance(value, int)
            else value
        )
        print(f"  {name:18} {shown}")
    return code


if __name__ == "__main__":
    sys.exit(main())
