"""``gateway explain``: the decision for one request, step by step (``gateway.explain``).

``--tenant ID`` decides on the license the tenant store holds for that tenant (as a request
with only the tenant header would be); with ``--key`` the store's record of the key's tenant
counts too (a newer license, a revocation, a suspension), and with
``license.classic_keys = "store"`` the store says whether a classic key was imported. A
``memory://`` store lives inside the gateway process: explain then reads the
``store.seed`` file, as the gateway does at start.

    gateway explain --app operations POST /api/v1/shipments/1/optimize --tier core
    gateway explain --app operations GET /api/v1/phi/x --tenant acme --config gateway.toml
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.config import Config, load_config
from gateway.decision import TenantRecord
from gateway.errors import LicenseError
from gateway.explain import evaluate, explanation_document, explanation_lines, hypothetical_license
from gateway.matrix import APP_NAMES
from gateway.routes import ROLES
from gateway.store import StoreError

if TYPE_CHECKING:
    from gateway.store import TenantStore


def add_parsers(commands: Any) -> None:
    explain = commands.add_parser("explain", help="show the decision for one request")
    explain.add_argument("--config", type=Path, default=Path("gateway.toml"))
    explain.add_argument("--app", required=True, choices=APP_NAMES)
    explain.add_argument("method")
    explain.add_argument("path")
    explain.add_argument("--key", help="a license key as a client would send it")
    explain.add_argument("--tier", help="a hypothetical license of this tier")
    explain.add_argument(
        "--tenant", help="the tenant id header: decide on the license the tenant store holds"
    )
    explain.add_argument("--addon", action="append", default=[], metavar="NAME")
    explain.add_argument("--role", choices=ROLES)
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gateway.cli import EXIT_INVALID, EXIT_OK
    from gateway.cli import UsageError as CliUsageError

    if args.key is None and args.tier is None and args.tenant is None:
        raise CliUsageError("explain needs --key, --tier or --tenant")
    if args.tier is not None and (args.key is not None or args.tenant is not None):
        raise CliUsageError("--tier is a hypothetical license: not with --key or --tenant")
    config = load_config(args.config)
    hypothetical = None
    if args.tier is not None:
        try:
            hypothetical = hypothetical_license(config.matrix, args.tier, tuple(args.addon))
        except ValueError as exc:
            raise CliUsageError(str(exc)) from exc
    record: TenantRecord | None = None
    classic_known: bool | None = None
    if args.key is not None or args.tenant is not None:
        try:
            record, classic_known = asyncio.run(_from_store(config, args.key, args.tenant))
        except StoreError as exc:
            print(f"gateway: the tenant store cannot answer: {exc}", file=sys.stderr)
            return EXIT_INVALID
    found = evaluate(
        config,
        args.app,
        args.method,
        args.path,
        key=args.key,
        license=hypothetical,
        role=args.role,
        tenant=args.tenant,
        record=record,
        classic_known=classic_known,
    )
    if args.json:
        print(msgspec.json.encode(explanation_document(found, config)).decode())
    else:
        for label, value in explanation_lines(found, config):
            print(f"{label + ':':16} {value}")
    return EXIT_OK


async def _from_store(
    config: Config, key: str | None, tenant: str | None
) -> tuple[TenantRecord | None, bool | None]:
    """The record of the request's tenant (the key's, else ``tenant``) and, in
    ``classic_keys = "store"`` mode, whether the store imported ``key`` as a classic key."""
    store = await _open(config)
    try:
        classic_known = None
        if (
            key is not None
            and config.settings.license.classic_keys == "store"
            and config.classic.is_classic(key)
        ):
            classic_known = await store.is_classic_key(key)
        who = tenant
        if key is not None:
            try:
                who = config.keyring.verify(key).claims.sub
            except LicenseError:
                who = None  # refused before any record counts
        record = await store.get(who) if who is not None else None
        return record, classic_known
    finally:
        await store.close()


async def _open(config: Config) -> TenantStore:
    from gateway.revocations import with_revocation_list
    from gateway.store import open_store, per_process
    from gateway.store.seed import import_tenants, read_tenants

    url = config.store_url
    store = with_revocation_list(open_store(url, config.keyring), config)
    seed = config.settings.store.seed
    if per_process(url) and seed is not None:
        await import_tenants(store, read_tenants(config.resolve(seed)))
    return store
