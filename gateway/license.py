"""License keys: compact JWS (RFC 7515) signed with EdDSA / Ed25519 (RFC 8037).

The gateway holds public keys only, in a ``KeyRing`` by ``kid`` (``<kid>.pub`` PEM files),
so signing keys rotate with overlap. ``KeyRing.verify`` checks structure and signature and
returns the claims; time-dependent checks (``nbf``, ``exp``, grace) belong to the decision,
so a verified key can be cached while its validity keeps moving with the clock.

    ring = KeyRing.load(Path("keys/"))
    lic = ring.verify(token)          # raises LicenseError(reason) on a bad key
    lic.claims.tier, lic.claims.sub
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import os
import re
import sys
from pathlib import Path
from sys import intern
from typing import Any, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import ConfigError, ConfigProblem, LicenseError

MAX_KEY_BYTES = 4096
TOKEN_TYPE = "license+jwt"
DEFAULT_CLASSIC_PATTERN = r"^[A-Z0-9]{5}(-[A-Z0-9]{5}){4}$"
_DOT = ord(".")  # ``_DOT in key`` finds a byte in C; ``b"." in key`` costs ten times more

ExpiryStrategy = Literal["restrict", "revoke", "maintain"]

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Unpadded base64url ends with 2 or 3 characters for a final 1 or 2 bytes; the last of them
# then carries 4 or 2 bits no byte uses. RFC 4648 §3.5 wants those bits zero: any other
# spelling decodes to the same bytes but is a different token, with its own fingerprint and
# cache entry, so a fingerprint blocklist could be dodged 16 ways. By length % 4, the last
# characters whose unused bits are zero:
_CANONICAL_LAST = {
    2: frozenset(_B64URL_ALPHABET[::16]),
    3: frozenset(_B64URL_ALPHABET[::4]),
}
_KID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Seats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ops_users: int
    drivers: int


class LicenseClaims(msgspec.Struct, frozen=True, omit_defaults=True):
    """The claims of docs/design.md §4. Unknown claims are ignored, so issuers can add fields."""

    iss: str
    sub: str  # tenant id (custID)
    jti: str  # license id
    iat: int
    nbf: int
    exp: int
    tier: str
    serial: int
    addons: tuple[str, ...] = ()
    seats: Seats | None = None
    trial: bool = False
    grandfather_until: int | None = None
    grandfather_tier: str | None = None
    expiry: ExpiryStrategy | None = None  # default: "revoke" for trials, else "restrict"

    @property
    def expiry_strategy(self) -> ExpiryStrategy:
        if self.expiry is not None:
            return self.expiry
        return "revoke" if self.trial else "restrict"


class _JoseHeader(msgspec.Struct, frozen=True):
    alg: str
    kid: str | None = None
    typ: str | None = None
    crit: list[str] | None = None


class License(msgspec.Struct, frozen=True):
    """A verified key: its claims, the signing key id and a short fingerprint for logs."""

    claims: LicenseClaims
    kid: str
    fingerprint: str


_claims_decoder = msgspec.json.Decoder(LicenseClaims)
_header_decoder = msgspec.json.Decoder(_JoseHeader)
_json_encoder = msgspec.json.Encoder()


def fingerprint(token: str) -> str:
    """A short, non-reversible id of a key, safe for logs and events."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _b64decode(part: str, what: str) -> bytes:
    """Canonical unpadded base64url only (one spelling per byte string): a set look-up on
    the last character, no re-encoding, since this runs for every never-seen key."""
    tail = len(part) % 4
    if tail == 1 or not _B64URL.fullmatch(part):
        raise LicenseError("license_malformed", f"{what} is not base64url")
    if tail and part[-1] not in _CANONICAL_LAST[tail]:
        raise LicenseError("license_malformed", f"{what} is not canonical base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise LicenseError("license_malformed", f"{what} is not base64url") from exc


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class KeyRing:
    """Public keys by ``kid``. ``verify`` is the only way a key becomes trusted."""

    __slots__ = ("keys", "_material")

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = keys
        self._material = {
            kid: key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            for kid, key in keys.items()
        }

    def same_keys(self, other: KeyRing) -> bool:
        """The same key ids *and* the same key behind each: a key replaced under its old
        kid (rotated out, or compromised) is a different ring."""
        return self._material == other._material

    @classmethod
    def load(cls, folder: Path) -> KeyRing:
        """Load every ``<kid>.pub`` in ``folder``; a bad file is a ``ConfigError``."""
        problems: list[ConfigProblem] = []
        keys: dict[str, Ed25519PublicKey] = {}
        if not folder.is_dir():
            raise ConfigError([ConfigProblem(str(folder), "license.public_keys", "not a folder")])
        for path in sorted(folder.glob("*.pub")):
            kid = path.stem
            if not _KID.match(kid):
                problems.append(ConfigProblem(str(path), "license.public_keys", "bad key id"))
                continue
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except (OSError, ValueError) as exc:
                problems.append(
                    ConfigProblem(str(path), "license.public_keys", f"not a PEM public key: {exc}")
                )
                continue
            if not isinstance(key, Ed25519PublicKey):
                problems.append(
                    ConfigProblem(str(path), "license.public_keys", "not an Ed25519 key")
                )
                continue
            keys[kid] = key
        if problems:
            raise ConfigError(problems)
        return cls(keys)

    def verify(self, token: str) -> License:
        """Check size, structure, header, key id and signature, in that order."""
        return self.check_signature(self.parse(token))

    def parse(self, token: str) -> ParsedKey:
        """The cheap checks (size, structure, header, key id): microseconds, so a flood of
        garbage never reaches the expensive signature check."""
        if len(token) > MAX_KEY_BYTES:
            raise LicenseError("license_malformed", f"key longer than {MAX_KEY_BYTES} bytes")
        if not token.isascii():
            raise LicenseError("license_malformed", "key is not ASCII")
        parts = token.split(".")
        if len(parts) != 3:
            raise LicenseError("license_malformed", "not a compact JWS (three dot-separated parts)")
        header_part, payload_part, signature_part = parts
        try:
            header = _header_decoder.decode(_b64decode(header_part, "header"))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 inside JSON
            raise LicenseError("license_malformed", f"header: {exc}") from exc
        if header.alg != "EdDSA":
            raise LicenseError("license_malformed", f"alg {header.alg!r} is not accepted (EdDSA)")
        if header.typ is not None and header.typ != TOKEN_TYPE:
            raise LicenseError("license_malformed", f"typ {header.typ!r} is not {TOKEN_TYPE!r}")
        if header.crit:
            raise LicenseError("license_malformed", f"unsupported critical headers {header.crit}")
        payload = _b64decode(payload_part, "payload")
        signature = _b64decode(signature_part, "signature")
        if header.kid is None:
            raise LicenseError("license_unknown_key", "no kid in the header")
        key = self.keys.get(header.kid)
        if key is None:
            raise LicenseError("license_unknown_key", f"no public key with kid {header.kid!r}")
        return ParsedKey(token, header.kid, key, header_part, payload_part, payload, signature)

    def check_signature(self, parsed: ParsedKey) -> License:
        """The expensive step (an Ed25519 verification, about 70 µs), then the claims."""
        signing_input = f"{parsed.header_part}.{parsed.payload_part}".encode("ascii")
        try:
            parsed.key.verify(parsed.signature, signing_input)
        except InvalidSignature as exc:
            raise LicenseError("license_bad_signature", "signature does not verify") from exc
        try:
            claims = _claims_decoder.decode(parsed.payload)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 inside JSON
            raise LicenseError("license_malformed", f"claims: {exc}") from exc
        return License(_shared_strings(claims), intern(parsed.kid), fingerprint(parsed.token))


def _shared_strings(claims: LicenseClaims) -> LicenseClaims:
    """The claims with the strings many licenses repeat (issuer, tier, add-ons) as one
    shared object each: 100,000 cached licenses otherwise hold 100,000 copies of "fleet"."""
    return msgspec.structs.replace(
        claims,
        iss=intern(claims.iss),
        tier=intern(claims.tier),
        addons=tuple(intern(addon) for addon in claims.addons),
    )


class ParsedKey:
    """A key that passed the cheap checks, ready for ``KeyRing.check_signature``."""

    __slots__ = ("token", "kid", "key", "header_part", "payload_part", "payload", "signature")

    def __init__(
        self,
        token: str,
        kid: str,
        key: Ed25519PublicKey,
        header_part: str,
        payload_part: str,
        payload: bytes,
        signature: bytes,
    ) -> None:
        self.token = token
        self.kid = kid
        self.key = key
        self.header_part = header_part
        self.payload_part = payload_part
        self.payload = payload
        self.signature = signature


def sign_license(private_key: Ed25519PrivateKey, kid: str, claims: LicenseClaims) -> str:
    """Encode and sign ``claims`` as a compact JWS; any JOSE library can verify it."""
    header = _json_encoder.encode({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": kid})
    payload = _json_encoder.encode(msgspec.to_builtins(claims))
    signing_input = f"{_b64encode(header)}.{_b64encode(payload)}"
    signature = private_key.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{_b64encode(signature)}"


def generate_keypair(folder: Path, kid: str) -> tuple[Path, Path]:
    """Write ``<kid>.key`` (PKCS#8 PEM, mode 0600) and ``<kid>.pub`` into ``folder``."""
    if not _KID.match(kid):
        raise ValueError(f"bad key id {kid!r}: letters, digits, '.', '_', '-' (max 64)")
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{kid}.key", folder / f"{kid}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Created with 0600 from the start: never world-readable, not even for an instant.
    with open(private_path, "xb", opener=_open_private) as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def load_signing_key(path: Path) -> tuple[Ed25519PrivateKey, str]:
    """Read a private key file; its key id is the file name without ``.key``."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key, path.stem


def decode_unverified(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """Header and claims without any check, for ``gateway license inspect`` without keys."""
    parts = token.split(".")
    if len(parts) != 3:
        raise LicenseError("license_malformed", "not a compact JWS (three dot-separated parts)")
    try:
        header = msgspec.json.decode(_b64decode(parts[0], "header"))
        claims = msgspec.json.decode(_b64decode(parts[1], "payload"))
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise LicenseError("license_malformed", str(exc)) from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise LicenseError("license_malformed", "header and payload must be JSON objects")
    return header, claims


class ClassicKeys:
    """Recognises classic X Dispatch keys by the configured pattern (compiled once).

    Every request with a key asks, so ``matches`` tells most signed and malformed keys
    apart without running the pattern, from what the parsed pattern says it can match:
    no key with a dot (``dotless``, the default pattern's case: a signed key has two),
    and keys whose length is in ``sizes`` only (29 for the default pattern; a range:
    ``in`` it is one C-level test)."""

    __slots__ = ("_match", "dotless", "sizes")

    def __init__(self, pattern: str = DEFAULT_CLASSIC_PATTERN) -> None:
        self._match = re.compile(pattern).fullmatch
        self.dotless, self.sizes = _pattern_shape(pattern)

    def is_classic(self, key: str) -> bool:
        return self._match(key) is not None

    def matches(self, key: bytes) -> bool:
        """``is_classic`` for a header value as sent (bytes read as latin-1)."""
        if self.dotless and _DOT in key:
            return False
        if len(key) not in self.sizes:
            return False
        return self._match(key.decode("latin-1")) is not None


def _pattern_shape(pattern: str) -> tuple[bool, range]:
    """(no match can contain a dot, the lengths a match can have) read from the parsed
    pattern (an unbounded length runs to ``sys.maxsize``); (False, every length) —
    nothing known — if Python's parser is not what we read."""
    try:
        parser = importlib.import_module("re._parser")
        parsed = parser.parse(pattern)
        low, high = parsed.getwidth()
        dotless = not _may_match(ord("."), parsed.data)
    except Exception:  # another Python's internals: assume nothing
        return False, range(sys.maxsize)
    return dotless, range(low, sys.maxsize if high >= parser.MAXWIDTH else high + 1)


def _may_match(char: int, parsed: Any) -> bool:
    """Could a match of the parsed pattern contain ``char``? Some part that consumes
    characters must be able to consume it. Anything not recognised here counts as
    "could" (the answer is only ever used to skip a match)."""
    c: Any = importlib.import_module("re._constants")

    def in_set(items: list[tuple[Any, Any]]) -> bool:
        found, negate = False, False
        for op, av in items:
            if op is c.NEGATE:
                negate = True
            elif op is c.LITERAL:
                found = found or av == char
            elif op is c.RANGE:
                found = found or av[0] <= char <= av[1]
            elif op is c.CATEGORY and av in (c.CATEGORY_DIGIT, c.CATEGORY_SPACE, c.CATEGORY_WORD):
                found = found or chr(char).isalnum() or chr(char) in "_ \t\n\r\f\v"
            else:
                return True
        return found != negate

    def walk(items: Any) -> bool:
        for op, av in items:
            if op is c.LITERAL:
                hit = av == char
            elif op is c.NOT_LITERAL or op is c.ANY:
                hit = op is c.ANY or av != char
            elif op is c.IN:
                hit = in_set(av)
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                hit = walk(av[2])
            elif op is c.SUBPATTERN:
                hit = walk(av[3])
            elif op is c.ATOMIC_GROUP:
                hit = walk(av)
            elif op is c.BRANCH:
                hit = any(walk(branch) for branch in av[1])
            elif op is c.GROUPREF_EXISTS:
                hit = walk(av[1]) or (av[2] is not None and walk(av[2]))
            elif op in (c.AT, c.GROUPREF, c.ASSERT, c.ASSERT_NOT):
                hit = False  # consume nothing, or only what a group consumed
            else:
                return True
            if hit:
                return True
        return False

    return walk(parsed)
