"""A real identity provider for tests: a JWKS endpoint served over HTTP on loopback
(aiohttp) and tokens signed with the private halves of its keys (made with
``cryptography`` per test session, never committed).

    provider = IdentityProvider()
    await provider.start()
    provider.publish(make_key("RS256", "rsa-1"))
    token = provider.token(provider.keys[0], tenant="t1", role="admin")
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.harness import start_app

ISSUER = "https://idp.test/"
AUDIENCE = "entitlement-gateway"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class SigningKey:
    """One provider key: ``private`` signs, ``jwk`` (public, with ``kid``) is published."""

    def __init__(self, alg: str, kid: str, private: PrivateKey, jwk: dict[str, Any]) -> None:
        self.alg = alg
        self.kid = kid
        self.private = private
        self.jwk = jwk


def make_key(alg: str, kid: str) -> SigningKey:
    """A fresh key pair for ``alg`` (RS256, ES256 or EdDSA)."""
    if alg == "RS256":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
        private: PrivateKey = rsa_key
    elif alg == "ES256":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
        private = ec_key
    elif alg == "EdDSA":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        jwk = OKPAlgorithm.to_jwk(ed_key.public_key(), as_dict=True)
        private = ed_key
    else:
        raise ValueError(alg)
    jwk.update(kid=kid, use="sig")
    return SigningKey(alg, kid, private, jwk)


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for tenant ``t1``, user ``u1``, role ``admin``; ``overrides`` win
    (a value of None removes the claim)."""
    now = int(time.time())
    fields: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now - 10,
        "exp": now + 600,
        "sub": "u1",
        "tenant": "t1",
        "role": "admin",
    }
    fields.update(overrides)
    return {name: value for name, value in fields.items() if value is not None}


class IdentityProvider:
    """The JWKS endpoint at ``url``, serving the public keys in ``keys``.

    ``status``: answer with this status (and no keys) instead, to play an outage;
    ``hold``: keep requests waiting (a provider that does not answer) until it is cleared
    or the server stops; ``requests`` counts what reached it."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = []
        self.extra: list[dict[str, Any]] = []  # raw members published as they are
        self.status = 200
        self.body: bytes | None = None  # answer these bytes instead of the key set
        self.hold = False
        self.requests = 0
        self.port = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def publish(self, *keys: SigningKey) -> None:
        """Serve exactly these keys from now on (a rotation at the provider)."""
        self.keys = list(keys)

    def release(self) -> None:
        """Answer the requests held so far (and any later ones)."""
        self.hold = False
        self._released.set()

    def document(self) -> dict[str, Any]:
        return {"keys": [key.jwk for key in self.keys] + self.extra}

    def token(self, key: SigningKey, **overrides: Any) -> str:
        return jwt.encode(
            claims(**overrides), key.private, algorithm=key.alg, headers={"kid": key.kid}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        # A free port the first time; a restart (or a port the test chose) keeps it.
        self._runner, self.port = await start_app(app, self.port)

    async def stop(self) -> None:
        """Stop answering (the port then refuses connections)."""
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.hold:
            await self._released.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="provider unavailable")
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response(self.document())
