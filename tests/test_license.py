"""License keys: the compact JWS codec, the key ring, key files and classic keys
(docs/design.md §4)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError, LicenseError
from gateway.license import (
    DEFAULT_CLASSIC_PATTERN,
    MAX_KEY_BYTES,
    ClassicKeys,
    KeyRing,
    LicenseClaims,
    Seats,
    decode_unverified,
    fingerprint,
    generate_keypair,
    load_signing_key,
    sign_license,
)

IssueKey = Callable[..., str]

NOW = 1_800_000_000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: object) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def good_claims(**overrides: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "iss": "tests",
        "sub": "tenant-1",
        "jti": "lic-1",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 86400,
        "tier": "fleet",
        "serial": 7,
    }
    claims.update(overrides)
    return claims


def forge(
    key: Ed25519PrivateKey,
    *,
    header: object = None,
    payload: bytes | None = None,
    claims: object = None,
) -> str:
    """A token signed with ``key`` over exactly the header and payload given (no checks)."""
    if header is None:
        header = {"alg": "EdDSA", "typ": "license+jwt", "kid": "test"}
    header_part = b64json(header)
    if payload is None:
        payload = json.dumps(good_claims() if claims is None else claims).encode()
    signing_input = f"{header_part}.{b64(payload)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode('ascii')))}"


def reason_of(ring: KeyRing, token: str) -> str:
    with pytest.raises(LicenseError) as caught:
        ring.verify(token)
    return caught.value.reason


def public_pem(key_dir: Path) -> bytes:
    return (key_dir / "test.pub").read_bytes()


# --------------------------------------------------------------------------- verify: accept


def test_valid_key_round_trips_its_claims(keyring: KeyRing, signing_key: Ed25519PrivateKey) -> None:
    claims = LicenseClaims(
        iss="billing",
        sub="acme",
        jti="lic-42",
        iat=NOW,
        nbf=NOW,
        exp=NOW + 365 * 86400,
        tier="core",
        serial=3,
        addons=("route_distribution", "sms_messaging"),
        seats=Seats(ops_users=2, drivers=4),
        trial=True,
        grandfather_until=NOW + 90 * 86400,
        grandfather_tier="enterprise",
        expiry="maintain",
    )
    token = sign_license(signing_key, "test", claims)

    lic = keyring.verify(token)

    assert lic.claims == claims
    assert lic.kid == "test"
    assert lic.fingerprint == fingerprint(token)
    assert len(lic.fingerprint) == 12 and lic.fingerprint not in token


def test_defaults_are_omitted_and_restored(
    keyring: KeyRing, signing_key: Ed25519PrivateKey
) -> None:
    claims = LicenseClaims(
        iss="i", sub="t", jti="j", iat=NOW, nbf=NOW, exp=NOW + 1, tier="core", serial=1
    )
    token = sign_license(signing_key, "test", claims)
    _, raw = decode_unverified(token)
    assert set(raw) == {"iss", "sub", "jti", "iat", "nbf", "exp", "tier", "serial"}
    lic = keyring.verify(token)
    assert lic.claims == claims
    assert lic.claims.addons == () and lic.claims.seats is None and lic.claims.trial is False
    assert lic.claims.expiry_strategy == "restrict"


def test_unknown_claims_are_ignored(keyring: KeyRing, signing_key: Ed25519PrivateKey) -> None:
    token = forge(signing_key, claims=good_claims(plan_note="annual", region="eu"))
    assert keyring.verify(token).claims.tier == "fleet"


def test_expiry_strategy_defaults() -> None:
    base = good_claims()
    paid = msgspec.convert(base, LicenseClaims)
    trial = msgspec.convert({**base, "trial": True}, LicenseClaims)
    trial_restrict = msgspec.convert({**base, "trial": True, "expiry": "restrict"}, LicenseClaims)
    assert paid.expiry_strategy == "restrict"
    assert trial.expiry_strategy == "revoke"
    assert trial_restrict.expiry_strategy == "restrict"


def test_key_of_exactly_the_size_limit_is_accepted(
    keyring: KeyRing, signing_key: Ed25519PrivateKey
) -> None:
    sizes: dict[int, str] = {}
    for header_pad in range(4):
        header = {"alg": "EdDSA", "typ": "license+jwt", "kid": "test", "x": "p" * header_pad}
        for iss_pad in range(2750, 2950):
            token = forge(signing_key, header=header, claims=good_claims(iss="i" * iss_pad))
            sizes.setdefault(len(token), token)
    assert keyring.verify(sizes[MAX_KEY_BYTES]).claims.sub == "tenant-1"
    assert reason_of(keyring, sizes[MAX_KEY_BYTES + 1]) == "license_malformed"


# --------------------------------------------------------------------------- verify: reject


def _header(**fields: object) -> dict[str, object]:
    header: dict[str, object] = {"alg": "EdDSA", "typ": "license+jwt", "kid": "test"}
    header.update(fields)
    return {name: value for name, value in header.items() if value is not None}


def _swap_part(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def _flip_middle_char(part: str) -> str:
    middle = len(part) // 2
    replacement = "A" if part[middle] != "A" else "B"
    return part[:middle] + replacement + part[middle + 1 :]


def _hs256_with_public_pem(key_dir: Path) -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the public key's PEM bytes."""
    header_part = b64json({"alg": "HS256", "typ": "license+jwt", "kid": "test"})
    payload_part = b64json(good_claims(tier="enterprise"))
    signing_input = f"{header_part}.{payload_part}".encode("ascii")
    mac = hmac.new(public_pem(key_dir), signing_input, hashlib.sha256).digest()
    return f"{header_part}.{payload_part}.{b64(mac)}"


def _rs256() -> str:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(
        good_claims(),
        rsa_key,
        algorithm="RS256",
        headers={"kid": "test", "typ": "license+jwt"},
    )


# Each case: a function building the token from (signing key, key dir, a valid token).
TokenMaker = Callable[[Ed25519PrivateKey, Path, str], str]

REJECTIONS: list[Any] = [
    # size and alphabet
    pytest.param(lambda k, d, t: "a" * (MAX_KEY_BYTES + 1), "license_malformed", id="over-4KiB"),
    pytest.param(
        lambda k, d, t: forge(k, claims=good_claims(iss="x" * 4000)),
        "license_malformed",
        id="signed-but-over-4KiB",
    ),
    pytest.param(lambda k, d, t: t[:10] + "é" + t[11:], "license_malformed", id="non-ascii"),
    pytest.param(lambda k, d, t: t + "\n", "license_malformed", id="trailing-newline"),
    pytest.param(lambda k, d, t: " " + t, "license_malformed", id="leading-space"),
    # structure
    pytest.param(lambda k, d, t: "", "license_malformed", id="empty"),
    pytest.param(lambda k, d, t: t.rsplit(".", 1)[0], "license_malformed", id="two-parts"),
    pytest.param(lambda k, d, t: t + ".e30", "license_malformed", id="four-parts"),
    pytest.param(lambda k, d, t: t.replace(".", ""), "license_malformed", id="one-part"),
    pytest.param(lambda k, d, t: "a.b.c.d.e", "license_malformed", id="five-parts-jwe"),
    # base64 of each part
    pytest.param(lambda k, d, t: _swap_part(t, 0, "!!!!"), "license_malformed", id="header-b64"),
    pytest.param(lambda k, d, t: _swap_part(t, 0, ""), "license_malformed", id="header-empty"),
    pytest.param(
        lambda k, d, t: _swap_part(t, 1, t.split(".")[1][:-1] + "*"),
        "license_malformed",
        id="payload-b64",
    ),
    pytest.param(
        lambda k, d, t: _swap_part(t, 1, t.split(".")[1] + "=="),
        "license_malformed",
        id="payload-padded",
    ),
    pytest.param(
        lambda k, d, t: _swap_part(t, 2, t.split(".")[2][:40] + "+/" + t.split(".")[2][42:]),
        "license_malformed",
        id="signature-standard-alphabet",
    ),
    pytest.param(
        lambda k, d, t: _swap_part(t, 2, t.split(".")[2][:-1]),
        "license_malformed",
        id="signature-length-mod-4-is-1",
    ),
    pytest.param(lambda k, d, t: _swap_part(t, 2, ""), "license_malformed", id="signature-empty"),
    # the header
    pytest.param(
        lambda k, d, t: _swap_part(t, 0, b64(b"not json")),
        "license_malformed",
        id="header-not-json",
    ),
    pytest.param(
        lambda k, d, t: forge(k, header=["EdDSA", "test"]), "license_malformed", id="header-array"
    ),
    pytest.param(lambda k, d, t: forge(k, header="EdDSA"), "license_malformed", id="header-string"),
    pytest.param(
        lambda k, d, t: forge(k, header={"typ": "license+jwt", "kid": "test"}),
        "license_malformed",
        id="header-without-alg",
    ),
    pytest.param(
        lambda k, d, t: forge(k, header=_header(kid=7)), "license_malformed", id="kid-not-string"
    ),
    pytest.param(
        lambda k, d, t: f"{b64json(_header(alg='none'))}.{t.split('.')[1]}.",
        "license_malformed",
        id="alg-none-unsigned",
    ),
    pytest.param(
        lambda k, d, t: forge(k, header=_header(alg="none")),
        "license_malformed",
        id="alg-none-signed",
    ),
    pytest.param(
        lambda k, d, t: forge(k, header=_header(alg="eddsa")),
        "license_malformed",
        id="alg-lower-case",
    ),
    pytest.param(lambda k, d, t: _hs256_with_public_pem(d), "license_malformed", id="alg-HS256"),
    pytest.param(lambda k, d, t: _rs256(), "license_malformed", id="alg-RS256"),
    pytest.param(
        lambda k, d, t: forge(k, header=_header(typ="JWT")), "license_malformed", id="typ-JWT"
    ),
    pytest.param(
        lambda k, d, t: forge(k, header=_header(crit=["exp"])),
        "license_malformed",
        id="crit-present",
    ),
    # key ids
    pytest.param(
        lambda k, d, t: forge(k, header=_header(kid=None)), "license_unknown_key", id="no-kid"
    ),
    pytest.param(
        lambda k, d, t: forge(k, header=_header(kid="other")),
        "license_unknown_key",
        id="unknown-kid",
    ),
    pytest.param(
        lambda k, d, t: forge(k, header=_header(kid="test.pub")),
        "license_unknown_key",
        id="kid-file-name",
    ),
    # signatures
    pytest.param(
        lambda k, d, t: _swap_part(t, 1, b64json(good_claims(tier="enterprise"))),
        "license_bad_signature",
        id="tampered-payload",
    ),
    pytest.param(
        lambda k, d, t: _swap_part(t, 2, _flip_middle_char(t.split(".")[2])),
        "license_bad_signature",
        id="tampered-signature",
    ),
    pytest.param(
        lambda k, d, t: _swap_part(t, 2, b64(bytes(64))),
        "license_bad_signature",
        id="zero-signature",
    ),
    pytest.param(
        lambda k, d, t: _swap_part(t, 2, b64(b"short")),
        "license_bad_signature",
        id="short-signature",
    ),
    pytest.param(
        lambda k, d, t: forge(Ed25519PrivateKey.generate(), claims=good_claims()),
        "license_bad_signature",
        id="other-key-same-kid",
    ),
    pytest.param(
        lambda k, d, t: _swap_part(
            t, 0, b64json({"kid": "test", "typ": "license+jwt", "alg": "EdDSA"})
        ),
        "license_bad_signature",
        id="header-reordered-after-signing",
    ),
    # claims, properly signed
    pytest.param(
        lambda k, d, t: forge(k, payload=b"not json"), "license_malformed", id="claims-not-json"
    ),
    pytest.param(lambda k, d, t: forge(k, claims=[1, 2]), "license_malformed", id="claims-array"),
    *[
        pytest.param(
            (lambda missing: lambda k, d, t: forge(k, claims=_without(good_claims(), missing)))(
                field
            ),
            "license_malformed",
            id=f"claims-missing-{field}",
        )
        for field in ("iss", "sub", "jti", "iat", "nbf", "exp", "tier", "serial")
    ],
    *[
        pytest.param(
            (lambda f, v: lambda k, d, t: forge(k, claims=good_claims(**{f: v})))(field, value),
            "license_malformed",
            id=f"claims-{field}-{label}",
        )
        for field, value, label in (
            ("serial", "7", "string"),
            ("exp", 1.5, "float"),
            ("iat", None, "null"),
            ("sub", 42, "int"),
            ("tier", ["fleet"], "list"),
            ("addons", "sms_messaging", "string"),
            ("addons", [1, 2], "ints"),
            ("seats", {"ops_users": 1}, "partial"),
            ("seats", {"ops_users": 1, "drivers": 1, "admins": 1}, "extra-field"),
            ("seats", 5, "int"),
            ("trial", "yes", "string"),
            ("expiry", "forever", "unknown"),
            ("grandfather_until", "2026-01-01", "string"),
        )
    ],
]


def _without(claims: dict[str, object], field: str) -> dict[str, object]:
    return {name: value for name, value in claims.items() if name != field}


@pytest.mark.parametrize(("make", "reason"), REJECTIONS)
def test_verify_rejects(
    keyring: KeyRing,
    signing_key: Ed25519PrivateKey,
    key_dir: Path,
    make: TokenMaker,
    reason: str,
) -> None:
    valid = forge(signing_key)
    assert keyring.verify(valid).claims.tier == "fleet"  # the starting point is good
    assert reason_of(keyring, make(signing_key, key_dir, valid)) == reason


@pytest.mark.parametrize(
    ("header", "claims", "reason"),
    [
        pytest.param(_header(alg="HS256", kid="nope"), None, "license_malformed", id="alg-first"),
        pytest.param(_header(kid="nope"), ["x"], "license_unknown_key", id="kid-before-claims"),
    ],
)
def test_reasons_come_in_order(
    keyring: KeyRing,
    header: dict[str, object],
    claims: object,
    reason: str,
) -> None:
    # signed by a stranger: the signature is bad too, but an earlier check answers first
    token = forge(Ed25519PrivateKey.generate(), header=header, claims=claims)
    assert reason_of(keyring, token) == reason


def test_signature_is_checked_before_claims(keyring: KeyRing) -> None:
    token = forge(Ed25519PrivateKey.generate(), claims={"tier": 1})
    assert reason_of(keyring, token) == "license_bad_signature"


def test_public_key_as_hmac_secret_is_not_a_valid_signature_anywhere(key_dir: Path) -> None:
    """The forged HS256 token would pass a library that trusted the header's alg: the gateway
    must not be that library (the rejection case above), and PyJWT refuses it too."""
    token = _hs256_with_public_pem(key_dir)
    public_key = serialization.load_pem_public_key(public_pem(key_dir))
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(token, public_key, algorithms=["EdDSA"])  # type: ignore[arg-type]


def test_license_error_carries_reason_and_detail(keyring: KeyRing) -> None:
    with pytest.raises(LicenseError) as caught:
        keyring.verify("a.b")
    assert caught.value.reason == "license_malformed"
    assert "three" in caught.value.detail
    assert str(caught.value).startswith("license_malformed: ")


B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _spellings(part: str) -> list[str]:
    """Every spelling of ``part`` that decodes to the same bytes: the unused low bits of the
    last character (4 bits after 2 characters of a final group, 2 bits after 3) set."""
    unused = {2: 0b1111, 3: 0b11}[len(part) % 4]
    base = B64URL_ALPHABET.index(part[-1]) & ~unused
    return [part[:-1] + B64URL_ALPHABET[base | bits] for bits in range(unused + 1)]


def _with_group_tail(encode: Callable[[str], str], tail: int) -> str:
    """``encode(filler)`` for the first filler whose base64url length % 4 is ``tail``."""
    for size in range(8):
        part = encode("x" * size)
        if len(part) % 4 == tail:
            return part
    raise AssertionError("no filler size gives that length")


def test_a_signature_has_one_spelling_not_sixteen(
    keyring: KeyRing, signing_key: Ed25519PrivateKey
) -> None:
    token = forge(signing_key)
    signing_input, signature = token.rsplit(".", 1)
    spellings = _spellings(signature)
    assert len(spellings) == 16 and signature in spellings
    for spelling in spellings:
        respelled = f"{signing_input}.{spelling}"
        if spelling == signature:
            assert keyring.verify(respelled).claims.tier == "fleet"
        else:
            assert reason_of(keyring, respelled) == "license_malformed", spelling


@pytest.mark.parametrize("tail", [2, 3])
@pytest.mark.parametrize("segment", ["header", "payload"])
def test_a_header_or_payload_has_one_spelling(
    keyring: KeyRing, signing_key: Ed25519PrivateKey, segment: str, tail: int
) -> None:
    """Signed over the respelled segment, so only the spelling check can refuse it."""
    header = {"alg": "EdDSA", "typ": "license+jwt", "kid": "test"}
    if segment == "header":
        parts = [
            _with_group_tail(lambda filler: b64json({**header, "x": filler}), tail),
            b64json(good_claims()),
        ]
    else:
        parts = [
            b64json(header),
            _with_group_tail(lambda filler: b64json(good_claims(x=filler)), tail),
        ]
    index = 0 if segment == "header" else 1
    spellings = _spellings(parts[index])
    for spelling in spellings:
        parts[index] = spelling
        signing_input = ".".join(parts)
        token = f"{signing_input}.{b64(signing_key.sign(signing_input.encode('ascii')))}"
        if spelling == spellings[0]:
            assert keyring.verify(token).claims.tier == "fleet"
        else:
            assert reason_of(keyring, token) == "license_malformed", spelling


def test_verified_licenses_share_their_repeated_strings(
    keyring: KeyRing, issue_key: IssueKey
) -> None:
    """Issuer, tier, add-ons and key id are one object across cached licenses (RSS with
    100,000 of them in loadtests/RESULTS.md), and the claims are unchanged."""
    keys = [issue_key(sub=f"tenant-{n}", tier="fleet", addons=("sms_messaging",)) for n in range(2)]
    first, second = (keyring.verify(key) for key in keys)
    assert first.claims.tier is second.claims.tier
    assert first.claims.iss is second.claims.iss
    assert first.claims.addons[0] is second.claims.addons[0]
    assert first.kid is second.kid
    _, raw = decode_unverified(keys[0])
    assert msgspec.structs.asdict(first.claims) == {
        **msgspec.structs.asdict(first.claims),
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()},
    }


# --------------------------------------------------------------------------- interoperability


def test_pyjwt_verifies_a_signed_license(
    issue_key: IssueKey, key_dir: Path, keyring: KeyRing
) -> None:
    token = issue_key(
        tier="fleet",
        addons=("personalized_url",),
        seats=Seats(ops_users=7, drivers=9),
        serial=12,
    )
    public_key = serialization.load_pem_public_key(public_pem(key_dir))

    decoded = jwt.decode(token, public_key, algorithms=["EdDSA"])  # type: ignore[arg-type]

    assert jwt.get_unverified_header(token) == {
        "alg": "EdDSA",
        "typ": "license+jwt",
        "kid": "test",
    }
    assert decoded == msgspec.json.decode(msgspec.json.encode(keyring.verify(token).claims))
    assert decoded["sub"] == "tenant-1"
    assert decoded["tier"] == "fleet"
    assert decoded["addons"] == ["personalized_url"]
    assert decoded["seats"] == {"ops_users": 7, "drivers": 9}
    assert decoded["serial"] == 12


def test_pyjwt_rejects_a_tampered_license(issue_key: IssueKey, key_dir: Path) -> None:
    token = _swap_part(issue_key(), 1, b64json(good_claims(tier="enterprise")))
    public_key = serialization.load_pem_public_key(public_pem(key_dir))
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, public_key, algorithms=["EdDSA"])  # type: ignore[arg-type]


def test_keyring_verifies_a_pyjwt_token(keyring: KeyRing, signing_key: Ed25519PrivateKey) -> None:
    now = int(time.time())
    claims = {
        "iss": "pyjwt",
        "sub": "acme",
        "jti": "lic-pyjwt",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "tier": "enterprise",
        "serial": 5,
        "addons": ["soc2_end_to_end"],
        "seats": {"ops_users": 11, "drivers": 12},
        "trial": False,
    }
    token = jwt.encode(
        claims,
        signing_key,
        algorithm="EdDSA",
        headers={"kid": "test", "typ": "license+jwt"},
    )

    lic = keyring.verify(token)

    assert lic.kid == "test"
    assert lic.claims == LicenseClaims(
        iss="pyjwt",
        sub="acme",
        jti="lic-pyjwt",
        iat=now,
        nbf=now,
        exp=now + 3600,
        tier="enterprise",
        serial=5,
        addons=("soc2_end_to_end",),
        seats=Seats(ops_users=11, drivers=12),
    )


def test_pyjwt_default_typ_is_refused(keyring: KeyRing, signing_key: Ed25519PrivateKey) -> None:
    token = jwt.encode(good_claims(), signing_key, algorithm="EdDSA", headers={"kid": "test"})
    assert jwt.get_unverified_header(token)["typ"] == "JWT"
    assert reason_of(keyring, token) == "license_malformed"


# --------------------------------------------------------------------------- property


_text = st.text(min_size=1, max_size=24)
_int = st.integers(min_value=0, max_value=2**53)


@st.composite
def license_claims(draw: st.DrawFn) -> LicenseClaims:
    iat = draw(st.integers(min_value=0, max_value=2**40))
    grandfather = draw(st.booleans())
    return LicenseClaims(
        iss=draw(_text),
        sub=draw(_text),
        jti=draw(st.uuids().map(str) | _text),
        iat=iat,
        nbf=iat + draw(st.integers(min_value=0, max_value=86400)),
        exp=iat + draw(st.integers(min_value=1, max_value=10 * 365 * 86400)),
        tier=draw(st.sampled_from(["core", "fleet", "enterprise"]) | _text),
        serial=draw(_int),
        addons=tuple(draw(st.lists(_text, max_size=5))),
        seats=draw(
            st.none()
            | st.builds(
                Seats,
                ops_users=st.integers(min_value=0, max_value=10_000),
                drivers=st.integers(min_value=0, max_value=10_000),
            )
        ),
        trial=draw(st.booleans()),
        grandfather_until=draw(_int) if grandfather else None,
        grandfather_tier=draw(st.sampled_from(["fleet", "enterprise"])) if grandfather else None,
        expiry=draw(st.sampled_from([None, "restrict", "revoke", "maintain"])),
    )


@settings(max_examples=60, deadline=None)
@given(claims=license_claims())
def test_sign_verify_round_trip(
    keyring: KeyRing, signing_key: Ed25519PrivateKey, claims: LicenseClaims
) -> None:
    token = sign_license(signing_key, "test", claims)
    assert token.isascii() and token.count(".") == 2
    lic = keyring.verify(token)
    assert lic.claims == claims
    assert lic.kid == "test"


# --------------------------------------------------------------------------- KeyRing.load


def _write_pem(path: Path, key: Any) -> None:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_load_reads_every_pub_file_by_kid(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "k2025")
    generate_keypair(tmp_path, "k2026.b")
    (tmp_path / "README.md").write_text("not a key")
    ring = KeyRing.load(tmp_path)
    assert sorted(ring.keys) == ["k2025", "k2026.b"]


def test_load_of_an_empty_folder_is_an_empty_ring(tmp_path: Path) -> None:
    assert KeyRing.load(tmp_path).keys == {}


def test_rotation_overlap(tmp_path: Path) -> None:
    """Two key ids in the ring: keys signed by either verify."""
    generate_keypair(tmp_path, "old")
    generate_keypair(tmp_path, "new")
    ring = KeyRing.load(tmp_path)
    claims = msgspec.convert(good_claims(), LicenseClaims)
    for kid in ("old", "new"):
        key, loaded_kid = load_signing_key(tmp_path / f"{kid}.key")
        assert loaded_kid == kid
        assert ring.verify(sign_license(key, kid, claims)).kid == kid
    # and a key signed by "old" but labelled "new" does not
    old_key, _ = load_signing_key(tmp_path / "old.key")
    assert reason_of(ring, sign_license(old_key, "new", claims)) == "license_bad_signature"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(lambda: b"hello", "not a PEM public key", id="not-pem"),
        pytest.param(lambda: b"", "not a PEM public key", id="empty"),
        pytest.param(
            lambda: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "not a PEM public key",
            id="bad-pem-body",
        ),
        pytest.param(
            lambda: (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ),
            "not an Ed25519 key",
            id="rsa",
        ),
        pytest.param(
            lambda: (
                ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ),
            "not an Ed25519 key",
            id="ec-p256",
        ),
        pytest.param(
            lambda: Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "not a PEM public key",
            id="private-key-as-pub",
        ),
    ],
)
def test_load_rejects_bad_files_naming_them(
    tmp_path: Path, content: Callable[[], bytes], message: str
) -> None:
    generate_keypair(tmp_path, "good")
    bad = tmp_path / "bad.pub"
    bad.write_bytes(content())

    with pytest.raises(ConfigError) as caught:
        KeyRing.load(tmp_path)

    [problem] = caught.value.problems
    assert problem.file == str(bad)
    assert problem.key == "license.public_keys"
    assert message in problem.message
    assert str(bad) in str(caught.value)


def test_load_lists_every_bad_file(tmp_path: Path) -> None:
    (tmp_path / "a.pub").write_bytes(b"junk")
    (tmp_path / "b.pub").write_bytes(b"junk")
    with pytest.raises(ConfigError) as caught:
        KeyRing.load(tmp_path)
    assert [p.file for p in caught.value.problems] == [
        str(tmp_path / "a.pub"),
        str(tmp_path / "b.pub"),
    ]


def test_load_rejects_a_bad_kid_file_name(tmp_path: Path, key_dir: Path) -> None:
    (tmp_path / "-bad.pub").write_bytes(public_pem(key_dir))
    with pytest.raises(ConfigError) as caught:
        KeyRing.load(tmp_path)
    assert caught.value.problems[0].message == "bad key id"


def test_load_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        KeyRing.load(tmp_path / "absent")
    assert caught.value.problems[0].file == str(tmp_path / "absent")


# --------------------------------------------------------------------------- key files


def test_generate_keypair_writes_a_private_file_with_mode_0600(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "new" / "folder", "dev")

    assert private_path == tmp_path / "new" / "folder" / "dev.key"
    assert public_path == tmp_path / "new" / "folder" / "dev.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    key, kid = load_signing_key(private_path)
    assert kid == "dev"
    ring = KeyRing.load(public_path.parent)
    assert ring.keys["dev"].public_bytes_raw() == key.public_key().public_bytes_raw()


@pytest.mark.parametrize("existing", ["dev.key", "dev.pub"])
def test_generate_keypair_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path, "dev")
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_generate_keypair_twice_keeps_the_first_pair(tmp_path: Path) -> None:
    private_path, _ = generate_keypair(tmp_path, "dev")
    first = private_path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path, "dev")
    assert private_path.read_bytes() == first


@pytest.mark.parametrize("kid", ["", "-x", "a/b", "../up", "x" * 65, "sp ace"])
def test_generate_keypair_rejects_bad_kids(tmp_path: Path, kid: str) -> None:
    with pytest.raises(ValueError):
        generate_keypair(tmp_path, kid)
    assert list(tmp_path.iterdir()) == []


def test_load_signing_key_refuses_other_key_types(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        load_signing_key(path)


# --------------------------------------------------------------------------- decode_unverified


def test_decode_unverified_reads_without_checking() -> None:
    token = forge(Ed25519PrivateKey.generate(), header=_header(kid="whoever"))
    header, claims = decode_unverified(token)
    assert header["kid"] == "whoever"
    assert claims["tier"] == "fleet"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("a.b", id="two-parts"),
        pytest.param(f"{b64(b'[1]')}.{b64json({})}.sig", id="header-array"),
        pytest.param(f"{b64json({})}.{b64(b'nope')}.sig", id="payload-not-json"),
    ],
)
def test_decode_unverified_rejects_non_jws(token: str) -> None:
    with pytest.raises(LicenseError) as caught:
        decode_unverified(token)
    assert caught.value.reason == "license_malformed"


# --------------------------------------------------------------------------- classic keys


@pytest.mark.parametrize(
    ("key", "classic"),
    [
        pytest.param("ABCDE-12345-FGHIJ-67890-KLMNO", True, id="classic"),
        pytest.param("00000-00000-00000-00000-00000", True, id="digits"),
        pytest.param("abcde-12345-fghij-67890-klmno", False, id="lower-case"),
        pytest.param("ABCDE-12345-FGHIJ-67890", False, id="four-groups"),
        pytest.param("ABCDE-12345-FGHIJ-67890-KLMNO-PQRST", False, id="six-groups"),
        pytest.param("ABCD-12345-FGHIJ-67890-KLMNO", False, id="short-group"),
        pytest.param("ABCDE-12345-FGHIJ-67890-KLMNO\n", False, id="trailing-newline"),
        pytest.param("\nABCDE-12345-FGHIJ-67890-KLMNO", False, id="leading-newline"),
        pytest.param(" ABCDE-12345-FGHIJ-67890-KLMNO", False, id="leading-space"),
        pytest.param("ABCDE_12345_FGHIJ_67890_KLMNO", False, id="underscores"),
        pytest.param("ABCDE12345FGHIJ67890KLMNO", False, id="no-dashes"),
        pytest.param("ÄBCDE-12345-FGHIJ-67890-KLMNO", False, id="non-ascii"),
        pytest.param("", False, id="empty"),
    ],
)
def test_classic_default_pattern(key: str, classic: bool) -> None:
    assert ClassicKeys().is_classic(key) is classic
    assert ClassicKeys(DEFAULT_CLASSIC_PATTERN).is_classic(key) is classic
    assert ClassicKeys().matches(key.encode("latin-1", "replace")) is classic


@pytest.mark.parametrize(
    ("pattern", "dotless", "lengths"),
    [
        pytest.param(DEFAULT_CLASSIC_PATTERN, True, (29, 29), id="default"),
        pytest.param(r"XD-[0-9]{8}", True, (11, 11), id="custom"),
        pytest.param(r"[A-Z]+\.[0-9]+", False, (3, math.inf), id="a-dot"),
        pytest.param(r"a.c", False, (3, 3), id="any-character"),
        pytest.param(r"[^-]{4,6}", False, (4, 6), id="negated-set"),
        pytest.param(r"\w+|\d{2}", True, (1, math.inf), id="categories"),
        pytest.param(r"(?i)(x)[a-z]\1", True, (3, 3), id="group-reference"),
        pytest.param(r"[+-/]", False, (1, 1), id="a-range-over-the-dot"),
        pytest.param(r"\S+", False, (1, math.inf), id="not-space"),
    ],
)
def test_classic_pattern_shape_read_from_the_pattern(
    pattern: str, dotless: bool, lengths: tuple[int, float]
) -> None:
    keys = ClassicKeys(pattern)
    low, high = lengths
    sizes = range(low, sys.maxsize if high == math.inf else int(high) + 1)
    assert (keys.dotless, keys.sizes) == (dotless, sizes)


_PATTERNS = [
    DEFAULT_CLASSIC_PATTERN,
    r"XD-[0-9]{8}",
    r"[A-Z]+\.[0-9]+",
    r"[^-]{4,6}",
    r"(?i)(x)[a-z]\1",
    r"\w{3}(?=.)..?",
    r"[a-c.]{1,3}(-[0-9])?",
]


@settings(max_examples=400, deadline=None)
@given(
    pattern=st.sampled_from(_PATTERNS),
    key=st.one_of(
        st.text(alphabet="ABX0129-._ \nxaä", max_size=32),
        st.from_regex(r"[A-Z0-9]{5}(-[A-Z0-9]{5}){4}", fullmatch=True),
        st.from_regex(r"XD-[0-9]{8}", fullmatch=True),
        st.from_regex(r"[a-c.]{1,3}(-[0-9])?", fullmatch=True),
    ),
)
def test_a_key_as_bytes_matches_exactly_when_the_pattern_does(pattern: str, key: str) -> None:
    """The shortcuts (dot, length) never change an answer."""
    keys = ClassicKeys(pattern)
    assert keys.matches(key.encode("latin-1", "replace")) is keys.is_classic(
        key.encode("latin-1", "replace").decode("latin-1")
    )


def test_a_signed_license_is_not_classic(issue_key: IssueKey) -> None:
    assert not ClassicKeys().is_classic(issue_key())


def test_classic_custom_pattern() -> None:
    classic = ClassicKeys(r"XD-[0-9]{8}")
    assert classic.is_classic("XD-12345678")
    assert not classic.is_classic("XD-1234567")
    assert not classic.is_classic("XD-12345678\n")
    assert not classic.is_classic("prefix XD-12345678")  # the whole key must match
    assert not classic.is_classic("ABCDE-12345-FGHIJ-67890-KLMNO")
