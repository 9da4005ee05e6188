"""``gateway audit verify|show`` and the audit options every changing verb takes.

    gateway audit verify --log audit.jsonl          # 0 intact, 1 naming the first bad line
    gateway audit show --tenant acme --log audit.jsonl [--json]

Verbs that change licensing state take ``--audit-log FILE`` (else ``[audit] log`` of the
config they were given), ``--actor NAME`` (else the OS user) and ``--reason TEXT``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec

from gateway.audit import AuditLog, AuditRecord, os_user, read, verify

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def add_parsers(commands: Any) -> None:
    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="VERB"
    )
    check = audit.add_parser("verify", help="check the hash chain; name the first broken line")
    show = audit.add_parser("show", help="a tenant's history")
    show.add_argument("--tenant", required=True)
    show.add_argument("--json", action="store_true")
    for parser in (check, show):
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--log", type=Path, help="the audit log file")
        where.add_argument("--config", type=Path, help="gateway.toml or issuer.toml ([audit] log)")
    check.set_defaults(handler=_verify)
    show.set_defaults(handler=_show)


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--audit-log``, ``--actor``, ``--reason`` for a verb that changes something."""
    parser.add_argument("--audit-log", type=Path, help="append the audit line here")
    parser.add_argument("--actor", help="who does this (default: the OS user)")
    parser.add_argument("--reason", help="ticket or reason, recorded in the audit line")


def audit_log(args: argparse.Namespace, configured: Path | None) -> AuditLog | None:
    """The log a verb writes to: ``--audit-log``, else the config's ``[audit] log``."""
    path = getattr(args, "audit_log", None) or configured
    return AuditLog(path) if path is not None else None


def record(args: argparse.Namespace, configured: Path | None, **fields: Any) -> None:
    """Append one line for a CLI verb (``AuditError`` if it cannot be written). Without
    any audit log configured, say so on stderr: never silently unrecorded."""
    entry = AuditRecord(actor=args.actor or os_user(), reason=args.reason, **fields)
    write(args, configured, entry)


def write(args: argparse.Namespace, configured: Path | None, entry: AuditRecord) -> None:
    log = audit_log(args, configured)
    if log is None:
        print(
            f"gateway: note: {entry.action} not recorded in an audit log "
            "(give --audit-log or set [audit] log)",
            file=sys.stderr,
        )
        return
    log.append(entry)


def _log_path(args: argparse.Namespace) -> Path:
    if args.log is not None:
        return Path(args.log)
    from gateway.tomlfile import TomlDocument

    doc = TomlDocument.read(args.config)
    configured = doc.data.get("audit", {}).get("log")
    if not isinstance(configured, str):
        raise ValueError(f"{args.config}: no [audit] log configured")
    return Path(args.config.parent / configured).resolve()


def _verify(args: argparse.Namespace) -> int:
    path = _log_path(args)
    count, broken = verify(path)
    if broken is not None:
        print(f"{path}: BROKEN at {broken}")
        return EXIT_INVALID
    print(f"{path}: intact ({count} lines)")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    path = _log_path(args)
    lines = [line for line in read(path) if line.tenant == args.tenant]
    _, broken = verify(path)
    if args.json:
        for line in lines:
            print(msgspec.json.encode(line).decode())
    else:
        for line in lines:
            what = " ".join(
                part
                for part in (
                    line.license_id or "",
                    line.tier or "",
                    "+" + ",".join(line.addons) if line.addons else "",
                    f"key {line.fingerprint}" if line.fingerprint else "",
                    f"kid {line.kid}" if line.kid else "",
                    f"ref {line.ref}" if line.ref else "",
                    f"reason: {line.reason}" if line.reason else "",
                )
                if part
            )
            print(f"{line.ts}  {line.action:12} {line.actor:20} {what}")
        if not lines:
            print(f"no audit lines for tenant {args.tenant!r} in {path}")
    if broken is not None:
        print(f"warning: {path} is BROKEN at {broken}", file=sys.stderr)
    return EXIT_OK if broken is None else EXIT_INVALID
