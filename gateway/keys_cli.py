"""``gateway keys rotate|activate|retire|list``: the signing-key life cycle (gateway.signing_keys).

    gateway keys rotate --keys issuer-keys/ --publish /srv/gateway/keys/   # new kid, published
    gateway keys activate KID --keys issuer-keys/                        # the issuer signs with it
    gateway keys retire OLD --keys issuer-keys/ --ledger issuer.db --publish /srv/gateway/keys/
    gateway keys list --keys issuer-keys/

``--config issuer.toml`` stands for ``--keys``, ``--publish``, ``--ledger`` and the audit log
of the issuer's settings. The runbook (order of steps, reloads) is in docs/licensing.md.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.audit_cli import add_options, record
from gateway.ledger import Ledger
from gateway.signing_keys import activate, load_state, retire, rotate, signing_kid

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def add_parsers(keys: Any) -> None:
    """Add the verbs to the ``keys`` sub-command (beside ``keys generate``)."""
    rotate_parser = keys.add_parser(
        "rotate", help="new signing kid, public key published (not used until activated)"
    )
    rotate_parser.add_argument("--kid", help="key id (default: k<YYYYMMDD>-<random>)")
    activate_parser = keys.add_parser("activate", help="the issuer signs with KID from now on")
    activate_parser.add_argument("kid")
    retire_parser = keys.add_parser(
        "retire", help="unpublish KID once every license it signed has expired"
    )
    retire_parser.add_argument("kid")
    retire_parser.add_argument("--ledger", type=Path, help="the issuer's ledger (issuer.db)")
    retire_parser.add_argument(
        "--grace-days", type=int, default=7, help="the gateways' grace_days (default 7)"
    )
    listing = keys.add_parser("list", help="kids and their states")
    for parser in (rotate_parser, activate_parser, retire_parser, listing):
        parser.add_argument("--keys", type=Path, help="the issuer's key folder")
        parser.add_argument("--config", type=Path, help="issuer.toml (keys, publish, ledger)")
        if parser is not listing:
            parser.add_argument(
                "--publish", type=Path, action="append", default=[], metavar="DIR",
                help="a folder the gateways load public keys from (repeatable)",
            )  # fmt: skip
            add_options(parser)
    rotate_parser.set_defaults(handler=_rotate)
    activate_parser.set_defaults(handler=_activate)
    retire_parser.set_defaults(handler=_retire)
    listing.set_defaults(handler=_list)


class _Where:
    """Folders and files from the flags, else from ``--config issuer.toml``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from gateway.cli import UsageError

        self.keys: Path | None = args.keys
        self.publish: tuple[Path, ...] = tuple(getattr(args, "publish", []))
        self.ledger: Path | None = getattr(args, "ledger", None)
        self.audit: Path | None = None
        if args.config is not None:
            from gateway.issuer_config import load_issuer_config

            config = load_issuer_config(args.config, need_signing_key=False)
            self.keys = self.keys or config.keys_dir
            self.publish = self.publish or config.publish_dirs
            self.ledger = self.ledger or config.ledger_path
            self.audit = config.audit_path
        if self.keys is None:
            raise UsageError("give --keys DIR or --config issuer.toml")


def _rotate(args: argparse.Namespace) -> int:
    where = _Where(args)
    assert where.keys is not None
    if not where.publish:
        print("gateway: note: no --publish folder: copy the new .pub to every gateway yourself")
    kid = rotate(where.keys, where.publish, args.kid)
    record(args, where.audit, action="key_rotate", kid=kid,
           detail={"published_to": [str(p) for p in where.publish]})  # fmt: skip
    print(f"kid:       {kid} (published, not yet used for signing)")
    for folder in where.publish:
        print(f"published: {folder / (kid + '.pub')}")
    print("next:      reload every gateway (SIGHUP), check it accepts the kid, then")
    print(f"           gateway keys activate {kid} --keys {where.keys}")
    return EXIT_OK


def _activate(args: argparse.Namespace) -> int:
    where = _Where(args)
    assert where.keys is not None
    activate(where.keys, args.kid)
    record(args, where.audit, action="key_activate", kid=args.kid)
    print(f"{args.kid}: active; the issuer signs every new license with it")
    return EXIT_OK


def _retire(args: argparse.Namespace) -> int:
    from gateway.cli import UsageError

    where = _Where(args)
    assert where.keys is not None
    if where.ledger is None:
        raise UsageError("give --ledger issuer.db (or --config issuer.toml): retiring needs it")
    now = time.time()
    valid, latest = Ledger(where.ledger).signed_with(args.kid, now - args.grace_days * 86400)
    if valid:
        until = _date((latest or 0) + args.grace_days * 86400)
        print(
            f"gateway: refusing to retire {args.kid}: {valid} license(s) it signed are still "
            f"valid (the last one until {until}, grace included); re-issue them with the new "
            "kid or wait"
        )
        return EXIT_INVALID
    retire(where.keys, args.kid, where.publish)
    record(args, where.audit, action="key_retire", kid=args.kid,
           detail={"last_expiry": latest})  # fmt: skip
    print(f"{args.kid}: retired; its public key is removed from {len(where.publish)} folder(s)")
    print("next:      reload every gateway (SIGHUP): its keys then get license_unknown_key")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    where = _Where(args)
    assert where.keys is not None
    state = load_state(where.keys)
    signing = signing_kid(state)
    for kid, entry in sorted(state.keys.items(), key=lambda item: item[1].created):
        mark = "  <- signs" if kid == signing else ""
        print(f"{kid:24} {entry.state:10} created {_date(entry.created)}{mark}")
    return EXIT_OK


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
