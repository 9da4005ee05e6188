"""The peer architecture's decision service: nginx ``auth_request`` asks it about every
request, it answers 200 (with ``X-Entitlement-*`` headers nginx forwards) or 401/403.

It does the same license check and route lookup as the gateway, with the project's own
modules: ``gateway.license.KeyRing`` (through a verified-key cache), ``gateway.paths``,
``gateway.routes`` and ``gateway.decision.decide``; it reads the same ``gateway.toml``.
nginx passes the original method and URI in ``X-Original-Method`` / ``X-Original-URI``
and the client's headers as they are. (No tenant-store lookups: header keys only.)

    python loadtests/auth_service.py --config gateway.toml --app operations --port 8600
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import cachetools
import uvloop
from aiohttp import web

from gateway.config import Config, load_config
from gateway.decision import decide
from gateway.errors import LicenseError
from gateway.license import License
from gateway.matrix import AppName
from gateway.paths import PathRejected, canonical_path


class Decider:
    """The decision, with a cache of verified (and of failed) keys by digest."""

    def __init__(self, config: Config, app: AppName) -> None:
        self.config = config
        self.app = app
        lic = config.settings.license
        self.key_header = lic.header
        self.role_header = lic.role_header
        self.classic_prefixes = tuple(config.settings.apps[app].classic_path_prefixes)
        self._keys: cachetools.LRUCache[bytes, License | LicenseError] = cachetools.LRUCache(
            100_000
        )

    def license(self, token: str) -> License | LicenseError:
        digest = hashlib.blake2b(token.encode("latin-1"), digest_size=16).digest()
        found = self._keys.get(digest)
        if found is None:
            try:
                found = self.config.keyring.verify(token)
            except LicenseError as exc:
                found = exc
            self._keys[digest] = found
        return found

    async def handle(self, request: web.Request) -> web.Response:
        headers = request.headers
        method = headers.get("X-Original-Method", request.method)
        uri = headers.get("X-Original-URI", request.raw_path)
        token = headers.get(self.key_header)
        if token is not None and self.config.classic.is_classic(token):
            return web.Response(status=200)  # classic X Dispatch: untouched, ungated
        raw_path = uri.split("?", 1)[0]
        try:
            path = canonical_path(raw_path)
        except PathRejected:
            return web.Response(status=403)
        if self.classic_prefixes and path.startswith(self.classic_prefixes):
            return web.Response(status=200)
        app_routes = self.config.routes.apps[self.app]
        found = app_routes.match(method, path)
        presented = self.license(token) if token is not None else None
        role = headers.get(self.role_header)
        decision = decide(
            self.config.policy, found, app_routes.unmatched, presented, None, role, time.time()
        )
        if not decision.allowed:
            return web.Response(status=401 if decision.status == 401 else 403)
        ent, lic = decision.entitlement, decision.license
        if ent is None or lic is None:  # public route
            return web.Response(status=200)
        return web.Response(
            status=200,
            headers={
                "X-Entitlement-Tenant": lic.claims.sub,
                "X-Entitlement-Tier": ent.tier,
                "X-Entitlement-Features": ent.features_header,
                "X-Entitlement-Addons": ent.addons_header,
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--app", default="operations")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    decider = Decider(load_config(args.config), args.app)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", decider.handle)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
