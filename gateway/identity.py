"""Who is asking: the tenant, user and role of a request, from identity headers sent by a
trusted peer or from a verified bearer token (``[identity]`` in gateway.toml; README,
Identity).

The relay calls ``Identifier.identify`` once per request with the bytes it parsed, and
gets an ``Identity``, an ``IdentityError`` to answer with, or ``NEED_KEYS`` (the token names
a key id the key set lacks: ``await refresh_keys()``, then ask again with
``refreshed=True``). Everything on that path is synchronous and cached: a trusted peer costs
one dict look-up, a token seen before a digest and a dict look-up until its ``exp``.

    identifier = Identifier.from_config(config)
    await identifier.start()                      # loads the JWKS in jwt mode
    found = identifier.identify(peer, xff, tenant, user, role, authorization,
                                has_license=key is not None, now=time.time())
    if found is NEED_KEYS:
        await identifier.refresh_keys()
        found = identifier.identify(..., refreshed=True)
    if isinstance(found, IdentityError): ...answer found.status / found.code / found.detail
    refused = identifier.check_tenant(found, license.claims.sub)   # when a key was sent
"""

from __future__ import annotations

import hashlib
import re
from time import monotonic
from typing import TYPE_CHECKING, Any, Final, Literal

import jwt

from gateway.caches import bounded_put
from gateway.config import UNCONFIGURED_WARNING, Config, IdentitySettings, Settings
from gateway.errors import IdentityError
from gateway.jwks import JwksKeys
from gateway.peers import PeerTrust, parse_network
from gateway.routes import ROLES

if TYPE_CHECKING:
    from pathlib import Path

MAX_TOKEN_BYTES: Final = 8192
MAX_CLAIM_CHARS: Final = 256
_USERINFO = re.compile(r"//[^/@]*@")


def startup_warning(settings: Settings) -> str | None:
    """The line to log (warning) at start-up, or None: without ``[identity]`` any peer can
    choose its tenant and role."""
    return UNCONFIGURED_WARNING if settings.identity is None else None


# ------------------------------------------------------------------------------ results


class Identity:
    """Who is asking, as far as the gateway can tell; ``tenant`` None: no tenant was
    identified (a license key, if any, decides on its own).

    ``source``: ``"headers"`` (from a trusted peer, or any peer without ``[identity]``),
    ``"jwt"`` (a verified token), ``"none"`` (an untrusted peer's identity headers were
    ignored). ``strip``: lower-case names of request headers not to forward (the identity
    headers whenever they were not the source). ``upstream_headers``: lines to add for the
    upstream instead (jwt: the verified tenant, user and role under the ``[license]``
    header names)."""

    __slots__ = ("tenant", "user", "role", "source", "strip", "upstream_headers", "expires")

    def __init__(
        self,
        tenant: str | None,
        user: str | None,
        role: str | None,
        source: Literal["headers", "jwt", "none"],
        strip: frozenset[bytes] = frozenset(),
        upstream_headers: bytes = b"",
        expires: float = float("inf"),
    ) -> None:
        self.tenant = tenant
        self.user = user
        self.role = role
        self.source = source
        self.strip = strip
        self.upstream_headers = upstream_headers
        self.expires = expires  # jwt: exp plus the clock skew, wall clock

    def __repr__(self) -> str:
        return (
            f"Identity(tenant={self.tenant!r}, user={self.user!r}, role={self.role!r}, "
            f"source={self.source!r})"
        )


class NeedKeys:
    """The token names a key id the key set lacks and a refresh is allowed now."""

    __slots__ = ()


NEED_KEYS: Final = NeedKeys()


def _invalid(detail: str) -> IdentityError:
    return IdentityError("identity_invalid", 401, "Identity token invalid", detail)


_EXPIRED = _invalid("token expired")
_NOT_UTF8 = IdentityError("bad_header", 400, "Bad request header", "tenant id not UTF-8")
TENANT_MISMATCH: Final = IdentityError(
    "tenant_mismatch",
    403,
    "License is for another tenant",
    "the license key's tenant (sub) is not the identified tenant",
)


# ------------------------------------------------------------------------- bearer tokens


class BearerTokens:
    """Bearer tokens verified with PyJWT against ``JwksKeys``, cached by digest until their
    ``exp``; failures that cannot change (bad signature, wrong audience...) for a minute."""

    def __init__(
        self,
        settings: IdentitySettings,
        keys: JwksKeys,
        header_names: tuple[str, str, str],
        strip: frozenset[bytes],
        size: int = 100_000,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.algorithms = frozenset(settings.algorithms)
        self._header_names = header_names  # tenant, user, role, as [license] names them
        self._strip = strip
        self._size = size
        self._valid: dict[bytes, Identity] = {}
        self._invalid: dict[bytes, tuple[IdentityError, float]] = {}
        keys.on_change = self.clear  # a removed or replaced key must stop verifying at once

    def clear(self) -> None:
        self._valid.clear()
        self._invalid.clear()

    def verify(
        self, token: bytes, now: float, refreshed: bool
    ) -> Identity | IdentityError | NeedKeys:
        digest = hashlib.blake2b(token, digest_size=16).digest()
        found = self._valid.get(digest)
        if found is not None:
            if now < found.expires:
                return found
            del self._valid[digest]
            return _EXPIRED  # everything else about it was verified
        failed = self._invalid.get(digest)
        if failed is not None and failed[1] > monotonic():
            return failed[0]
        if len(token) > MAX_TOKEN_BYTES:
            return _invalid(f"token over {MAX_TOKEN_BYTES} bytes")
        result = self._verify(token, refreshed)
        if isinstance(result, Identity):
            bounded_put(self._valid, digest, result, self._size)
        elif isinstance(result, tuple):
            error, lasting = result
            if lasting:
                bounded_put(self._invalid, digest, (error, monotonic() + 60.0), 10_000)
            return error
        return result

    def _verify(
        self, token: bytes, refreshed: bool
    ) -> Identity | NeedKeys | tuple[IdentityError, bool]:
        """The identity, NEED_KEYS, or (error, whether it can be cached)."""
        try:
            text = token.decode("ascii")
            header = jwt.get_unverified_header(text)
        except (UnicodeDecodeError, jwt.DecodeError) as exc:
            return _invalid(f"malformed token: {exc}"), True
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            allowed = ", ".join(sorted(self.algorithms))
            return _invalid(f"alg {alg!r} not allowed (allowed: {allowed})"), True
        if not isinstance(kid, str):
            return _invalid("token header has no kid"), True
        key = self.keys.keys.get(kid)
        if key is None:
            if not refreshed and self.keys.may_refresh():
                return NEED_KEYS
            return self._unknown_kid(kid, refreshed), False
        if key.algorithm_name != alg:
            return _invalid(f"alg {alg} does not match key {kid!r} ({key.algorithm_name})"), True
        s = self.settings
        try:
            claims = jwt.decode(
                text,
                key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.clock_skew_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ImmatureSignatureError:
            return _invalid("token not yet valid (nbf or iat in the future)"), False
        except jwt.PyJWTError as exc:
            return _invalid(self._reason(exc)), True
        return self._identity(claims)

    def _unknown_kid(self, kid: str, refreshed: bool) -> IdentityError:
        keys = self.keys
        if not keys.keys:
            return _invalid(
                f"no signing keys loaded from {keys.source}: {keys.last_error or 'not loaded yet'}"
            )
        if refreshed and keys.last_error is not None:
            return _invalid(f"unknown kid {kid!r} (JWKS refresh failed: {keys.last_error})")
        when = "after refreshing the JWKS" if refreshed else "(JWKS refreshed moments ago)"
        return _invalid(f"unknown kid {kid!r} {when}")

    def _reason(self, exc: jwt.PyJWTError) -> str:
        s = self.settings
        if isinstance(exc, jwt.ExpiredSignatureError):
            return _EXPIRED.detail
        if isinstance(exc, jwt.InvalidAudienceError):
            return f"wrong audience (expected {s.audience!r})"
        if isinstance(exc, jwt.InvalidIssuerError):
            return f"wrong issuer (expected {s.issuer!r})"
        if isinstance(exc, jwt.InvalidSignatureError):
            return "bad signature"
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"token has no {exc.claim!r} claim"
        return f"invalid token: {exc}"

    def _identity(self, claims: dict[str, Any]) -> Identity | tuple[IdentityError, bool]:
        s = self.settings
        tenant = claims.get(s.tenant_claim)
        user = claims.get(s.user_claim)
        for name, value, required in ((s.tenant_claim, tenant, True), (s.user_claim, user, False)):
            if value is None and not required:
                continue
            if not isinstance(value, str) or not 0 < len(value) <= MAX_CLAIM_CHARS:
                return _invalid(f"claim {name!r} missing or not a string"), True
            if not value.isprintable():  # the value goes into header lines: no CR/LF
                return _invalid(f"claim {name!r} has control characters"), True
        role = self._role(claims.get(s.role_claim))
        lines = b"".join(
            b"%s: %s\r\n" % (name.encode(), value.encode())
            for name, value in zip(self._header_names, (tenant, user, role), strict=True)
            if value is not None
        )
        expires = float(claims["exp"]) + s.clock_skew_seconds
        return Identity(tenant, user, role, "jwt", self._strip, lines, expires)

    def _role(self, value: object) -> str | None:
        """The gateway role of a role claim: one value, or a list, where the most
        privileged mapped one wins (route ``roles`` are allow-lists); unmapped: None."""
        values = value if isinstance(value, list) else [value]
        mapped = set()
        for item in values:
            if isinstance(item, str):
                role = self.settings.role_map.get(item, item)
                if role in ROLES:
                    mapped.add(role)
        return next((role for role in ROLES if role in mapped), None)


# ---------------------------------------------------------------------------- the facade


class Identifier:
    """One process's identity source, built from ``[identity]`` (see the module docstring).

    ``token_header``: the lower-case name of the header the relay must capture (jwt mode;
    None otherwise). ``identity_headers``: the lower-case tenant, user and role header names
    (what ``Identity.strip`` holds when they are not to be forwarded)."""

    __slots__ = (
        "mode",
        "settings",
        "token_header",
        "identity_headers",
        "refuse_mismatch",
        "_bearer_scheme_required",
        "_trust",
        "_tokens",
        "_keys",
        "_trusted_nobody",
        "_ignored",
        "_untrusted",
        "_missing",
        "_not_bearer",
    )

    def __init__(
        self,
        settings: IdentitySettings | None,
        header_names: tuple[str, str, str],
        base: Path,
    ) -> None:
        self.mode: Literal["unconfigured", "headers", "jwt"] = (
            "unconfigured" if settings is None else settings.mode
        )
        self.settings = settings
        strip = frozenset(name.lower().encode() for name in header_names)
        self.identity_headers = strip
        self.refuse_mismatch = settings is not None and settings.tenant_mismatch == "refuse"
        self._trusted_nobody = Identity(None, None, None, "headers")
        self._ignored = Identity(None, None, None, "none", strip)
        tenant_header = header_names[0]
        self._untrusted = IdentityError(
            "identity_untrusted",
            401,
            "Identity headers not trusted",
            f"{tenant_header} is honoured only from trusted peers; send a license key",
        )
        self._trust: PeerTrust | None = None
        self._tokens: BearerTokens | None = None
        self._keys: JwksKeys | None = None
        self.token_header: bytes | None = None
        self._bearer_scheme_required = False
        if settings is not None and settings.mode == "headers":
            self._trust = PeerTrust(
                [parse_network(t) for t in settings.trusted_peers],
                [parse_network(t) for t in settings.trusted_proxies],
            )
        elif settings is not None:
            self._keys = JwksKeys(
                url=settings.jwks_url,
                file=None if settings.jwks_file is None else (base / settings.jwks_file),
                algorithms=frozenset(settings.algorithms),
                timeout=settings.jwks_timeout_seconds,
                refresh_seconds=settings.jwks_refresh_seconds,
                min_refresh_seconds=settings.jwks_min_refresh_seconds,
            )
            self._tokens = BearerTokens(settings, self._keys, header_names, strip)
            self.token_header = settings.header.lower().encode()
            self._bearer_scheme_required = self.token_header == b"authorization"
        header = settings.header if settings is not None else "Authorization"
        self._missing = _invalid(f"missing bearer token ({header})")
        self._not_bearer = _invalid(f"{header} is not a Bearer token")

    @classmethod
    def from_config(cls, config: Config) -> Identifier:
        lic = config.settings.license
        names = (lic.tenant_header, lic.user_header, lic.role_header)
        return cls(config.settings.identity, names, config.path.parent)

    def identify(
        self,
        peer: bytes,
        forwarded_for: bytes | None,
        tenant: bytes | None,
        user: bytes | None,
        role: bytes | None,
        token: bytes | None,
        *,
        has_license: bool,
        now: float,
        refreshed: bool = False,
    ) -> Identity | IdentityError | NeedKeys:
        """Who sent this request. ``peer``: the client's address (as the relay holds it,
        e.g. b"10.0.0.5"); ``forwarded_for``: the X-Forwarded-For value (several headers
        joined with ","); ``tenant``, ``user``, ``role``: the identity header values;
        ``token``: the ``token_header`` value; ``has_license``: a license key was sent."""
        tokens = self._tokens
        if tokens is not None:
            if token is None:
                return self._missing
            if token[:7].lower() == b"bearer ":
                token = token[7:].strip()
            elif self._bearer_scheme_required:
                return self._not_bearer
            if not token:
                return self._missing
            return tokens.verify(token, now, refreshed)
        trust = self._trust
        if trust is None or trust.honoured(peer, forwarded_for):
            if tenant is None and user is None and role is None:
                return self._trusted_nobody
            try:
                tenant_id = None if tenant is None else tenant.decode("utf-8")
            except UnicodeDecodeError:
                return _NOT_UTF8
            return Identity(
                tenant_id,
                None if user is None else user.decode("latin-1"),
                None if role is None else role.decode("latin-1"),
                "headers",
            )
        if tenant is not None and not has_license:
            return self._untrusted
        return self._ignored

    def check_tenant(self, identity: Identity, license_tenant: str) -> IdentityError | None:
        """403 ``tenant_mismatch`` when a presented license is for another tenant than the
        identified one (unless ``tenant_mismatch = "allow"``)."""
        if self.refuse_mismatch and identity.tenant is not None:
            if identity.tenant != license_tenant:
                return TENANT_MISMATCH
        return None

    async def refresh_keys(self) -> None:
        """After ``NEED_KEYS``: reload the JWKS (shared, rate-limited; never raises)."""
        if self._keys is not None:
            await self._keys.refresh()

    async def start(self) -> None:
        if self._keys is not None:
            await self._keys.start()

    async def stop(self) -> None:
        if self._keys is not None:
            await self._keys.stop()

    def describe(self) -> dict[str, Any] | None:
        """For ``GET /admin/config``: the mode and its settings, loaded key ids; no secret."""
        s = self.settings
        if s is None:
            return None
        out: dict[str, Any] = {"mode": s.mode, "tenant_mismatch": s.tenant_mismatch}
        if s.mode == "headers":
            out.update(trusted_peers=list(s.trusted_peers), trusted_proxies=list(s.trusted_proxies))
            return out
        keys = self._keys
        assert keys is not None
        out.update(
            header=s.header,
            issuer=s.issuer,
            audience=s.audience,
            algorithms=list(s.algorithms),
            jwks_url=None if s.jwks_url is None else _USERINFO.sub("//***@", s.jwks_url),
            jwks_file=s.jwks_file,
            key_ids=sorted(keys.keys),
            keys_loaded_at=keys.loaded_at,
            last_error=keys.last_error,
        )
        return out
