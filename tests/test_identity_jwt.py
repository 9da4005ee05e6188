"""Identity sources, part two: bearer tokens verified against a real JWKS endpoint served
over HTTP on loopback (``tests/idp.py``), and against a JWKS file.

Each test resolves tokens the way the relay must (``resolve`` below): ``identify``, and on
``NEED_KEYS`` ``await refresh_keys()`` then ``identify(..., refreshed=True)``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.config import IdentitySettings
from gateway.errors import IdentityError
from gateway.identity import NEED_KEYS, Identifier, Identity
from tests.harness import free_port
from tests.idp import AUDIENCE, ISSUER, IdentityProvider, SigningKey, claims, make_key

NAMES = ("X-Tenant-Id", "X-User-Id", "X-User-Role")
ROLE_MAP = {"tenant-admin": "admin", "member": "standard", "dispatcher": "dispatch_only"}


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return make_key("RS256", "rsa-1")


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return make_key("ES256", "ec-1")


@pytest.fixture(scope="session")
def ed_key() -> SigningKey:
    return make_key("EdDSA", "ed-1")


@pytest.fixture
async def provider(
    rsa_key: SigningKey, ec_key: SigningKey, ed_key: SigningKey
) -> AsyncIterator[IdentityProvider]:
    idp = IdentityProvider()
    idp.publish(rsa_key, ec_key, ed_key)
    await idp.start()
    yield idp
    await idp.stop()


def settings(**fields: Any) -> IdentitySettings:
    values: dict[str, Any] = {
        "mode": "jwt",
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "role_map": ROLE_MAP,
        "jwks_min_refresh_seconds": 0,
        "jwks_timeout_seconds": 2.0,
        **fields,
    }
    return msgspec.convert(values, IdentitySettings)


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    """``await started(jwks_url=...)`` → a started Identifier, stopped after the test."""
    running: list[Identifier] = []

    async def start(base: Path = Path("."), **fields: Any) -> Identifier:
        identifier = Identifier(settings(**fields), NAMES, base)
        await identifier.start()
        running.append(identifier)
        return identifier

    yield start
    for identifier in running:
        await identifier.stop()


async def resolve(identifier: Identifier, token: str | bytes | None) -> Identity | IdentityError:
    """What the relay does with one request's Authorization header value."""
    value = None if token is None else (token.encode() if isinstance(token, str) else token)
    if isinstance(token, str):
        value = b"Bearer " + value  # type: ignore[operator]
    ask: dict[str, Any] = {"has_license": False, "now": time.time()}
    found = identifier.identify(b"203.0.113.7", None, b"spoofed", None, b"owner", value, **ask)
    if found is NEED_KEYS:
        await identifier.refresh_keys()
        found = identifier.identify(
            b"203.0.113.7", None, b"spoofed", None, b"owner", value, refreshed=True, **ask
        )
    assert isinstance(found, Identity | IdentityError), found
    return found


def assert_invalid(found: Identity | IdentityError, fragment: str) -> None:
    assert isinstance(found, IdentityError), found
    assert (found.status, found.code) == (401, "identity_invalid")
    assert fragment in found.detail, found.detail


# ------------------------------------------------------------------------- valid tokens


@pytest.mark.parametrize(
    ("key_name", "role_claim", "role"),
    [
        pytest.param("rsa_key", "tenant-admin", "admin", id="RS256-mapped"),
        pytest.param(
            "ec_key", ["member", "dispatcher"], "standard", id="ES256-list-most-privileged"
        ),
        pytest.param("ed_key", "owner", "owner", id="EdDSA-gateway-role-name"),
        pytest.param("rsa_key", "auditor", None, id="RS256-unmapped-role"),
        pytest.param("ec_key", None, None, id="ES256-no-role"),
    ],
)
async def test_a_valid_token_identifies_tenant_user_and_mapped_role(
    request: pytest.FixtureRequest,
    provider: IdentityProvider,
    started: Callable[..., Any],
    key_name: str,
    role_claim: object,
    role: str | None,
) -> None:
    identifier = await started(jwks_url=provider.url)
    key: SigningKey = request.getfixturevalue(key_name)
    found = await resolve(identifier, provider.token(key, role=role_claim))
    assert isinstance(found, Identity)
    assert (found.tenant, found.user, found.role, found.source) == ("t1", "u1", role, "jwt")
    # The client's own identity headers never reach the upstream; the verified ones do.
    assert found.strip == frozenset({b"x-tenant-id", b"x-user-id", b"x-user-role"})
    expected = b"X-Tenant-Id: t1\r\nX-User-Id: u1\r\n"
    assert found.upstream_headers == expected + (
        b"X-User-Role: %s\r\n" % role.encode() if role else b""
    )


async def test_a_verified_token_is_served_from_the_cache_until_it_expires(
    provider: IdentityProvider, started: Callable[..., Any], rsa_key: SigningKey
) -> None:
    identifier = await started(jwks_url=provider.url, clock_skew_seconds=0)
    token = b"Bearer " + provider.token(rsa_key).encode()
    first = identifier.identify(
        b"", None, None, None, None, token, has_license=False, now=time.time()
    )
    fetched = provider.requests
    await provider.stop()  # the cache needs neither the provider nor a signature check
    again = identifier.identify(
        b"", None, None, None, None, token, has_license=False, now=time.time()
    )
    assert isinstance(first, Identity) and again is first
    assert provider.requests == fetched
    later = identifier.identify(
        b"", None, None, None, None, token, has_license=False, now=first.expires + 1
    )
    assert_invalid(later, "token expired")


# --------------------------------------------------------------------------- bad tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_input(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def _unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return _signing_input(header, payload) + "." + _b64(signature)


def _hs256(header: dict[str, Any], secret: bytes) -> str:
    signing_input = _signing_input(header, claims())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def alg_none(idp: IdentityProvider, key: SigningKey) -> str:
    return _unsigned({"alg": "none", "kid": key.kid, "typ": "JWT"}, claims())


def hs256_with_public_key(idp: IdentityProvider, key: SigningKey) -> str:
    """The classic confusion: HMAC keyed with the provider's public key (PEM bytes)."""
    pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _hs256({"alg": "HS256", "kid": key.kid, "typ": "JWT"}, pem)


def forged(idp: IdentityProvider, key: SigningKey) -> str:
    """Signed by another key under the published kid."""
    return idp.token(make_key(key.alg, key.kid))


def alg_swapped(idp: IdentityProvider, key: SigningKey) -> str:
    """An EdDSA signature under the RSA key's kid."""
    other = make_key("EdDSA", key.kid)
    return idp.token(other)


def tampered(idp: IdentityProvider, key: SigningKey) -> str:
    head, payload, signature = idp.token(key).split(".")
    evil = _b64(json.dumps(claims(tenant="t-enterprise")).encode())
    return f"{head}.{evil}.{signature}"


BAD_TOKENS: list[Any] = [
    pytest.param(
        lambda idp, k: idp.token(k, exp=int(time.time()) - 3600), "token expired", id="expired"
    ),
    pytest.param(
        lambda idp, k: idp.token(k, aud="another-api"), "wrong audience", id="other-audience"
    ),
    pytest.param(
        lambda idp, k: idp.token(k, iss="https://evil.test/"), "wrong issuer", id="other-issuer"
    ),
    pytest.param(
        lambda idp, k: idp.token(k, nbf=int(time.time()) + 3600),
        "not yet valid",
        id="not-yet-valid",
    ),
    pytest.param(lambda idp, k: idp.token(k, exp=None), "no 'exp' claim", id="no-exp"),
    pytest.param(lambda idp, k: idp.token(k, aud=None), "no 'aud' claim", id="no-aud"),
    pytest.param(
        lambda idp, k: idp.token(k, tenant=None), "claim 'tenant' missing", id="no-tenant"
    ),
    pytest.param(
        lambda idp, k: idp.token(k, tenant=42), "claim 'tenant' missing", id="tenant-number"
    ),
    pytest.param(
        lambda idp, k: idp.token(k, tenant="t1\r\nX-Entitlement-Tier: enterprise"),
        "control characters",
        id="tenant-header-injection",
    ),
    pytest.param(alg_none, "alg 'none' not allowed", id="alg-none"),
    pytest.param(hs256_with_public_key, "alg 'HS256' not allowed", id="hs256-public-key"),
    pytest.param(forged, "bad signature", id="forged-signature"),
    pytest.param(tampered, "bad signature", id="tampered-claims"),
    pytest.param(alg_swapped, "alg EdDSA does not match key 'rsa-1' (RS256)", id="alg-swapped"),
    pytest.param(lambda idp, k: "not-a-jwt", "malformed token", id="garbage"),
    pytest.param(lambda idp, k: "a.b.c", "malformed token", id="bad-base64"),
    pytest.param(lambda idp, k: _unsigned({"alg": "RS256"}, claims(), b"x"), "no kid", id="no-kid"),
    pytest.param(
        lambda idp, k: idp.token(make_key("RS256", "unknown")),
        "unknown kid 'unknown' after refreshing the JWKS",
        id="unknown-signing-key",
    ),
    pytest.param(lambda idp, k: "x" * 9000, "token over 8192 bytes", id="oversized"),
]


@pytest.mark.parametrize(("make_token", "detail"), BAD_TOKENS)
async def test_bad_tokens_are_identity_invalid_with_the_reason(
    provider: IdentityProvider,
    started: Callable[..., Any],
    rsa_key: SigningKey,
    make_token: Callable[[IdentityProvider, SigningKey], str],
    detail: str,
) -> None:
    identifier = await started(jwks_url=provider.url)
    token = make_token(provider, rsa_key)
    assert_invalid(await resolve(identifier, token), detail)
    assert_invalid(await resolve(identifier, token), detail)  # the same when cached


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        pytest.param(None, "missing bearer token (Authorization)", id="no-header"),
        pytest.param(b"Basic dXNlcjpwYXNz", "Authorization is not a Bearer token", id="basic"),
        pytest.param(b"Bearer   ", "missing bearer token", id="empty-bearer"),
    ],
)
async def test_a_request_without_a_bearer_token_is_identity_invalid(
    provider: IdentityProvider, started: Callable[..., Any], value: bytes | None, detail: str
) -> None:
    identifier = await started(jwks_url=provider.url)
    assert_invalid(await resolve(identifier, value), detail)


async def test_another_header_may_carry_the_bare_token(
    provider: IdentityProvider, started: Callable[..., Any], ed_key: SigningKey
) -> None:
    identifier = await started(jwks_url=provider.url, header="X-Id-Token")
    assert identifier.token_header == b"x-id-token"
    found = await resolve(identifier, provider.token(ed_key).encode())
    assert isinstance(found, Identity) and found.tenant == "t1"


# -------------------------------------------------------------------- rotation, outages


async def test_key_rotation_at_the_provider(
    provider: IdentityProvider, started: Callable[..., Any], rsa_key: SigningKey
) -> None:
    provider.publish(rsa_key)
    identifier = await started(jwks_url=provider.url)
    old = provider.token(rsa_key)
    assert isinstance(await resolve(identifier, old), Identity)

    new_key = make_key("ES256", "ec-2024")
    provider.publish(rsa_key, new_key)  # a new kid appears: refreshed on first sight
    found = await resolve(identifier, provider.token(new_key))
    assert isinstance(found, Identity) and found.tenant == "t1"

    provider.publish(new_key)  # the old key is withdrawn
    unknown = provider.token(make_key("RS256", "never-published"))
    assert_invalid(await resolve(identifier, unknown), "unknown kid 'never-published'")
    # That refresh saw the withdrawal: the old key's token is refused, cached or not.
    assert_invalid(await resolve(identifier, old), "unknown kid 'rsa-1' after refreshing")
    assert isinstance(await resolve(identifier, provider.token(new_key, sub="u2")), Identity)


async def test_a_withdrawn_key_is_refused_after_the_periodic_refresh(
    provider: IdentityProvider, started: Callable[..., Any], rsa_key: SigningKey, ed_key: SigningKey
) -> None:
    identifier = await started(
        jwks_url=provider.url, jwks_refresh_seconds=0.05, jwks_min_refresh_seconds=3600
    )
    old = provider.token(rsa_key)
    assert isinstance(await resolve(identifier, old), Identity)
    provider.publish(ed_key)
    while "rsa-1" in (identifier.describe() or {})["key_ids"]:  # nothing asked for it
        await asyncio.sleep(0.01)
    # The token verified before is no longer served from the cache: its kid is unknown.
    ask: dict[str, Any] = {"has_license": False, "now": time.time()}
    assert (
        identifier.identify(b"", None, None, None, None, b"Bearer " + old.encode(), **ask)
        is NEED_KEYS
    )
    assert_invalid(await resolve(identifier, old), "unknown kid 'rsa-1' after refreshing")


async def test_unknown_kids_refresh_at_most_once_per_interval(
    provider: IdentityProvider, started: Callable[..., Any]
) -> None:
    identifier = await started(jwks_url=provider.url, jwks_min_refresh_seconds=3600)
    fetched = provider.requests
    for n in range(20):
        await resolve(identifier, provider.token(make_key("EdDSA", f"made-up-{n}")))
    assert provider.requests == fetched + 1


async def test_concurrent_unknown_kids_share_one_fetch(
    provider: IdentityProvider, started: Callable[..., Any], ed_key: SigningKey
) -> None:
    provider.publish()
    identifier = await started(jwks_url=provider.url)
    provider.publish(ed_key)
    fetched = provider.requests
    provider.hold = True
    tokens = [provider.token(ed_key, sub=f"u{n}") for n in range(10)]
    pending = asyncio.gather(*(resolve(identifier, t) for t in tokens))
    while provider.requests == fetched:
        await asyncio.sleep(0.01)
    provider.release()
    found = await pending
    assert all(isinstance(f, Identity) for f in found)
    assert provider.requests == fetched + 1


@pytest.mark.parametrize(
    ("outage", "reason"),
    [
        pytest.param("status", "HTTP 503", id="answers-503"),
        pytest.param("junk", "not JSON", id="answers-junk"),
        pytest.param("empty", "no usable signing key", id="answers-no-keys"),
        pytest.param("down", "fetch failed", id="connection-refused"),
        pytest.param("hang", "no answer within 0.3 s", id="times-out"),
    ],
)
async def test_the_last_good_keys_stay_when_the_provider_fails(
    provider: IdentityProvider,
    started: Callable[..., Any],
    rsa_key: SigningKey,
    ec_key: SigningKey,
    outage: str,
    reason: str,
) -> None:
    identifier = await started(jwks_url=provider.url, jwks_timeout_seconds=0.3)
    if outage == "status":
        provider.status = 503
    elif outage == "junk":
        provider.body = b"<html>maintenance</html>"
    elif outage == "empty":
        provider.publish()
    elif outage == "down":
        await provider.stop()
    else:
        provider.hold = True
    unknown = provider.token(make_key("EdDSA", "rotated-in"))
    assert_invalid(await resolve(identifier, unknown), f"JWKS refresh failed: {reason}")
    # Fail-static: tokens of the keys known before the outage still verify, fresh ones too.
    for key in (rsa_key, ec_key):
        found = await resolve(identifier, provider.token(key, sub="fresh"))
        assert isinstance(found, Identity) and found.user == "fresh"
    described = identifier.describe() or {}
    assert described["key_ids"] == ["ec-1", "ed-1", "rsa-1"]
    assert reason in described["last_error"]


async def test_without_keys_ever_every_token_is_refused_with_the_reason(
    started: Callable[..., Any], rsa_key: SigningKey
) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    identifier = await started(jwks_url=url)
    token = IdentityProvider().token(rsa_key)
    found = await resolve(identifier, token)
    assert_invalid(found, f"no signing keys loaded from {url}: fetch failed")


async def test_the_provider_coming_back_heals_a_start_without_keys(
    started: Callable[..., Any], rsa_key: SigningKey
) -> None:
    idp = IdentityProvider()
    idp.port = free_port()
    identifier = await started(jwks_url=idp.url)
    assert_invalid(await resolve(identifier, idp.token(rsa_key)), "no signing keys loaded")
    idp.publish(rsa_key)
    await idp.start()
    try:
        assert isinstance(await resolve(identifier, idp.token(rsa_key)), Identity)
    finally:
        await idp.stop()


# ------------------------------------------------------------------------------ jwks_file


async def test_jwks_file_mode(
    tmp_path: Path, started: Callable[..., Any], rsa_key: SigningKey, ed_key: SigningKey
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_key.jwk]}))
    identifier = await started(tmp_path, jwks_file="jwks.json")
    idp = IdentityProvider()  # only to sign: nothing is served
    assert isinstance(await resolve(identifier, idp.token(rsa_key)), Identity)

    path.write_text(json.dumps({"keys": [ed_key.jwk]}))  # rotated in the file
    found = await resolve(identifier, idp.token(ed_key))
    assert isinstance(found, Identity) and found.tenant == "t1"
    assert_invalid(await resolve(identifier, idp.token(rsa_key, sub="u9")), "unknown kid 'rsa-1'")

    path.unlink()  # a file that disappears keeps the keys read last
    assert_invalid(
        await resolve(identifier, idp.token(make_key("ES256", "x"))),
        "JWKS refresh failed: cannot read",
    )
    assert isinstance(await resolve(identifier, idp.token(ed_key, sub="u3")), Identity)
    assert (identifier.describe() or {})["jwks_file"] == "jwks.json"


async def test_hmac_and_encryption_keys_in_a_key_set_are_never_used(
    provider: IdentityProvider, started: Callable[..., Any], rsa_key: SigningKey
) -> None:
    secret = b"shared-secret"
    provider.extra = [
        {"kty": "oct", "kid": "hmac", "k": _b64(secret)},
        {**make_key("RS256", "enc").jwk, "use": "enc"},
    ]
    identifier = await started(jwks_url=provider.url, algorithms=["RS256"])
    assert (identifier.describe() or {})["key_ids"] == ["rsa-1"]
    token = _hs256({"alg": "HS256", "kid": "hmac"}, secret)
    assert_invalid(await resolve(identifier, token), "alg 'HS256' not allowed")
    ec = make_key("ES256", "ec-1")  # published, but ES256 is not in algorithms here
    assert_invalid(await resolve(identifier, provider.token(ec)), "alg 'ES256' not allowed")
