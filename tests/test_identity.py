"""Identity sources, part one: the ``[identity]`` section (validation, ``gateway check``
warnings) and headers mode (which peers' identity headers are honoured, what is stripped,
tenant mismatch). Bearer tokens against a real JWKS endpoint: ``test_identity_jwt.py``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import pytest

from gateway.cli import main
from gateway.config import UNCONFIGURED_WARNING, IdentitySettings, load_config, load_settings
from gateway.errors import ConfigError, IdentityError
from gateway.identity import Identifier, Identity, startup_warning
from gateway.peers import PeerTrust, parse_network
from tests.idp import IdentityProvider, make_key

REPO = Path(__file__).resolve().parent.parent
NAMES = ("X-Tenant-Id", "X-User-Id", "X-User-Role")
STRIPPED = frozenset({b"x-tenant-id", b"x-user-id", b"x-user-role"})

Capture = pytest.CaptureFixture[str]


def with_identity(config_dir: Path, section: str) -> Path:
    path = config_dir / "gateway.toml"
    path.write_text(path.read_text() + "\n[identity]\n" + section)
    return path


def problems_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return [(p.key, p.message) for p in raised.value.problems]


JWT = 'mode = "jwt"\nissuer = "https://idp.test/"\naudience = "gw"\n'


@pytest.mark.parametrize(
    ("section", "key", "fragment"),
    [
        pytest.param('trusted_peers = ["10.0.0.5/32"]\n', "identity", "mode", id="mode-required"),
        pytest.param('mode = "headers"\n', "identity.trusted_peers", "required", id="no-peers"),
        pytest.param(
            'mode = "headers"\ntrusted_peers = ["10.0.0.1/8"]\n',
            "identity.trusted_peers",
            "has host bits set",
            id="host-bits",
        ),
        pytest.param(
            'mode = "headers"\ntrusted_peers = ["10.0.0.5"]\ntrusted_proxies = ["lb.local"]\n',
            "identity.trusted_proxies",
            "'lb.local' is not an address or network",
            id="proxy-not-an-address",
        ),
        pytest.param(
            'mode = "headers"\ntrusted_peers = ["10.0.0.5"]\njwks_url = "https://idp/jwks"\n',
            "identity.jwks_url",
            'only used with mode = "jwt"',
            id="jwt-key-in-headers-mode",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\ntrusted_peers = ["10.0.0.5"]\n',
            "identity.trusted_peers",
            'only used with mode = "headers"',
            id="headers-key-in-jwt-mode",
        ),
        pytest.param(JWT, "identity.jwks_url", "exactly one", id="no-jwks"),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\njwks_file = "jwks.json"\n',
            "identity.jwks_url",
            "exactly one",
            id="both-jwks",
        ),
        pytest.param(
            JWT + 'jwks_url = "ftp://idp/jwks"\n', "identity.jwks_url", "https://", id="ftp-url"
        ),
        pytest.param(
            'mode = "jwt"\naudience = "gw"\njwks_url = "https://idp/jwks"\n',
            "identity.issuer",
            "required",
            id="no-issuer",
        ),
        pytest.param(
            'mode = "jwt"\nissuer = "https://idp/"\njwks_url = "https://idp/jwks"\n',
            "identity.audience",
            "required",
            id="no-audience",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nalgorithms = ["RS256", "none"]\n',
            "identity.algorithms",
            "'none' is refused",
            id="alg-none",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nalgorithms = ["HS256"]\n',
            "identity.algorithms",
            "shared secret",
            id="alg-hs256",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nalgorithms = ["PS256"]\n',
            "identity.algorithms",
            "not supported",
            id="alg-unsupported",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nalgorithms = []\n',
            "identity.algorithms",
            "at least one",
            id="alg-empty",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nrole_map = { Boss = "superuser" }\n',
            "identity.role_map",
            "'Boss' maps to 'superuser'",
            id="role-map-unknown-role",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nheader = "X License"\n',
            "identity.header",
            "not a valid header name",
            id="header-invalid",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nheader = "x-license-key"\n',
            "identity.header",
            "already read by [license]",
            id="header-taken",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\nclock_skew_seconds = -1\n',
            "identity.clock_skew_seconds",
            "negative",
            id="negative-skew",
        ),
        pytest.param(
            JWT + 'jwks_url = "https://idp/jwks"\njwks_timeout_seconds = 0\n',
            "identity.jwks_timeout_seconds",
            "> 0",
            id="zero-timeout",
        ),
        pytest.param(
            JWT + 'jwks_file = "missing.json"\n',
            "identity.jwks_file",
            "cannot read",
            id="jwks-file-missing",
        ),
        pytest.param(
            'mode = "headers"\ntrusted_peer = ["10.0.0.5"]\n',
            "identity",
            "unknown field `trusted_peer`",
            id="unknown-key",
        ),
        pytest.param(
            'mode = "cookies"\n', "identity.mode", "Invalid enum value 'cookies'", id="unknown-mode"
        ),
    ],
)
def test_identity_section_problems_name_key_and_reason(
    config_dir: Path, section: str, key: str, fragment: str
) -> None:
    found = problems_of(with_identity(config_dir, section))
    assert any(k == key and fragment in m for k, m in found), found


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        pytest.param(b"{", "not JSON", id="not-json"),
        pytest.param(b'{"keys": {}}', 'a "keys" list', id="keys-not-a-list"),
        pytest.param(
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}).encode(),
            "no usable signing key: skipped h (HS256 not allowed)",
            id="only-an-hmac-key",
        ),
        pytest.param(
            json.dumps({"keys": [{"kty": "RSA", "kid": "r", "alg": ["RS256"]}]}).encode(),
            "no usable signing key: skipped r",
            id="alg-of-the-wrong-type",
        ),
    ],
)
def test_a_jwks_file_that_gives_no_usable_key_is_a_config_error(
    config_dir: Path, document: bytes, fragment: str
) -> None:
    (config_dir / "jwks.json").write_bytes(document)
    found = problems_of(with_identity(config_dir, JWT + 'jwks_file = "jwks.json"\n'))
    assert [k for k, _ in found] == ["identity.jwks_file"]
    assert fragment in found[0][1]


def test_valid_sections_load(config_dir: Path) -> None:
    key = make_key("EdDSA", "e1")
    (config_dir / "jwks.json").write_text(json.dumps({"keys": [key.jwk]}))
    path = config_dir / "gateway.toml"
    original = path.read_text()
    config = load_config(with_identity(config_dir, JWT + 'jwks_file = "jwks.json"\n'))
    assert config.settings.identity is not None
    assert config.settings.identity.mode == "jwt"
    path.write_text(original)
    section = (
        'mode = "headers"\ntrusted_peers = ["10.0.0.5", "fd00::/8"]\ntenant_mismatch = "allow"\n'
    )
    config = load_config(with_identity(config_dir, section))
    assert config.settings.identity == IdentitySettings(
        mode="headers", trusted_peers=("10.0.0.5", "fd00::/8"), tenant_mismatch="allow"
    )


def run(capsys: Capture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_check_warns_without_an_identity_section(capsys: Capture, config_dir: Path) -> None:
    code, out = run(capsys, "check", "--config", str(config_dir / "gateway.toml"))
    assert code == 0
    assert f"  warning: {UNCONFIGURED_WARNING}" in out.splitlines()
    assert "headers trusted from any peer" in UNCONFIGURED_WARNING

    path = with_identity(config_dir, 'mode = "headers"\ntrusted_peers = ["127.0.0.1"]\n')
    code, out = run(capsys, "check", "--config", str(path))
    assert code == 0 and "identity" not in out


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        pytest.param(
            'mode = "headers"\ntrusted_peers = ["0.0.0.0/0"]\n', "trusts every address", id="all"
        ),
        pytest.param(
            JWT + 'jwks_url = "http://idp.example/jwks.json"\n', "plain http", id="http-jwks"
        ),
    ],
)
def test_check_warns_about_unsafe_identity_settings(
    capsys: Capture, config_dir: Path, section: str, fragment: str
) -> None:
    code, out = run(capsys, "check", "--config", str(with_identity(config_dir, section)))
    assert code == 0
    assert any(
        line.startswith("  warning: identity.") and fragment in line for line in out.splitlines()
    )


def test_startup_warning_only_without_the_section(config_dir: Path) -> None:
    settings = load_settings(config_dir / "gateway.toml")
    assert startup_warning(settings) == UNCONFIGURED_WARNING
    path = with_identity(config_dir, 'mode = "headers"\ntrusted_peers = ["127.0.0.1"]\n')
    assert startup_warning(load_settings(path)) is None


def test_the_kubernetes_sidecar_chooses_an_identity_mode() -> None:
    settings = load_settings(REPO / "deploy" / "kubernetes" / "gateway.toml")
    assert settings.identity is not None
    assert startup_warning(settings) is None


# --------------------------------------------------------------------------- headers mode

PEERS = ["10.0.0.5/32", "::1/128"]
PROXIES = ["10.1.0.0/16"]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "honoured"),
    [
        pytest.param(b"10.0.0.5", None, True, id="trusted-peer"),
        pytest.param(b"10.0.0.6", None, False, id="untrusted-peer"),
        pytest.param(b"127.0.0.1", b"10.0.0.5", False, id="untrusted-peer-claims-trusted-origin"),
        pytest.param(b"::1", None, True, id="ipv6-peer"),
        pytest.param(b"::ffff:10.0.0.5", None, True, id="ipv4-mapped-peer"),
        pytest.param(b"", None, False, id="no-peer-address"),
        pytest.param(b"10.1.0.9", b"10.0.0.5", True, id="proxy-saw-trusted-peer"),
        pytest.param(b"10.1.0.9", b"10.0.0.5, 10.1.0.7", True, id="two-proxies"),
        pytest.param(b"10.1.0.9", b"10.0.0.5:8080", True, id="hop-with-port"),
        pytest.param(b"10.1.0.9", b"[::1]:443", True, id="ipv6-hop-with-port"),
        pytest.param(b"10.1.0.9", b"10.0.0.5, 203.0.113.7", False, id="client-prepended-spoof"),
        pytest.param(b"10.1.0.9", None, False, id="proxy-without-forwarded-for"),
        pytest.param(b"10.1.0.9", b"10.1.0.8", False, id="only-proxies"),
        pytest.param(b"10.1.0.9", b"10.0.0.5, garbage", False, id="hop-not-an-address"),
        pytest.param(b"10.1.0.9", b"10.0.0.5,", False, id="empty-hop"),
        pytest.param(b"10.1.0.9", b"10.0.0.5, \xff", False, id="non-ascii-hop"),
    ],
)
def test_identity_headers_are_honoured_from_trusted_peers_only(
    peer: bytes, forwarded_for: bytes | None, honoured: bool
) -> None:
    trust = PeerTrust([parse_network(p) for p in PEERS], [parse_network(p) for p in PROXIES])
    assert trust.honoured(peer, forwarded_for) is honoured
    assert trust.honoured(peer, forwarded_for) is honoured  # and from the cache


def test_peer_cache_is_bounded() -> None:
    trust = PeerTrust([parse_network("10.0.0.5")], [parse_network("10.1.0.0/16")], size=8)
    for n in range(100):
        trust.honoured(b"10.1.0.1", b"10.0.0.5, 192.0.2.%d" % n)
    assert len(trust._kinds) <= 8
    assert trust.honoured(b"10.0.0.5", None)


def headers_identifier(**fields: object) -> Identifier:
    settings = msgspec.convert(
        {"mode": "headers", "trusted_peers": PEERS, "trusted_proxies": PROXIES, **fields},
        IdentitySettings,
    )
    return Identifier(settings, NAMES, REPO)


TRUSTED, UNTRUSTED = b"10.0.0.5", b"127.0.0.1"


@pytest.mark.parametrize(
    ("peer", "tenant", "role", "has_license", "expected"),
    [
        pytest.param(TRUSTED, b"t1", b"admin", False, ("t1", "admin", "headers"), id="trusted"),
        pytest.param(TRUSTED, None, None, True, (None, None, "headers"), id="trusted-no-headers"),
        pytest.param(
            UNTRUSTED, b"t-enterprise", b"admin", False, "identity_untrusted", id="spoofed-tenant"
        ),
        pytest.param(
            UNTRUSTED, b"t-enterprise", b"admin", True, (None, None, "none"), id="spoof-with-key"
        ),
        pytest.param(UNTRUSTED, None, b"admin", True, (None, None, "none"), id="spoofed-role"),
        pytest.param(UNTRUSTED, None, None, False, (None, None, "none"), id="untrusted-nothing"),
        pytest.param(TRUSTED, b"t\xff", None, False, "bad_header", id="tenant-not-utf8"),
    ],
)
def test_headers_mode_identifies_or_refuses(
    peer: bytes,
    tenant: bytes | None,
    role: bytes | None,
    has_license: bool,
    expected: tuple[str | None, str | None, str] | str,
) -> None:
    found = headers_identifier().identify(
        peer, None, tenant, b"u1", role, None, has_license=has_license, now=0.0
    )
    if isinstance(expected, str):
        assert isinstance(found, IdentityError) and found.code == expected
        assert found.status == (400 if expected == "bad_header" else 401)
        return
    assert isinstance(found, Identity)
    assert (found.tenant, found.role, found.source) == expected
    # Headers not honoured are removed before the decision and never forwarded.
    assert found.strip == (STRIPPED if found.source == "none" else frozenset())
    assert found.upstream_headers == b""


def test_untrusted_tenant_header_detail_names_the_header() -> None:
    found = headers_identifier().identify(
        UNTRUSTED, None, b"t1", None, None, None, has_license=False, now=0.0
    )
    assert isinstance(found, IdentityError)
    assert found.code == "identity_untrusted"
    assert "X-Tenant-Id is honoured only from trusted peers" in found.detail


def test_without_a_section_headers_are_trusted_from_any_peer() -> None:
    identifier = Identifier(None, NAMES, REPO)
    found = identifier.identify(
        b"203.0.113.7", None, b"t1", b"u1", b"owner", None, has_license=False, now=0.0
    )
    assert isinstance(found, Identity)
    assert (found.tenant, found.user, found.role, found.strip) == ("t1", "u1", "owner", frozenset())
    assert identifier.token_header is None and identifier.describe() is None
    assert identifier.check_tenant(found, "another") is None  # as before: no mismatch check


@pytest.mark.parametrize(
    ("policy", "identified", "sub", "refused"),
    [
        pytest.param("refuse", "t1", "t2", True, id="mismatch-refused"),
        pytest.param("refuse", "t1", "t1", False, id="same-tenant"),
        pytest.param("refuse", None, "t2", False, id="nothing-identified"),
        pytest.param("allow", "t1", "t2", False, id="mismatch-allowed"),
    ],
)
def test_a_license_for_another_tenant_is_refused(
    policy: str, identified: str | None, sub: str, refused: bool
) -> None:
    identifier = headers_identifier(tenant_mismatch=policy)
    found = identifier.check_tenant(Identity(identified, None, None, "headers"), sub)
    if refused:
        assert isinstance(found, IdentityError)
        assert (found.status, found.code) == (403, "tenant_mismatch")
    else:
        assert found is None


def test_headers_mode_describes_itself() -> None:
    assert headers_identifier().describe() == {
        "mode": "headers",
        "tenant_mismatch": "refuse",
        "trusted_peers": PEERS,
        "trusted_proxies": PROXIES,
    }


async def test_the_identifier_follows_the_license_header_names_and_config_folder(
    config_dir: Path,
) -> None:
    key = make_key("EdDSA", "e1")
    (config_dir / "idp").mkdir()
    (config_dir / "idp" / "jwks.json").write_text(json.dumps({"keys": [key.jwk]}))
    path = config_dir / "gateway.toml"
    text = path.read_text().replace('tenant_header = "X-Tenant-Id"', 'tenant_header = "X-Org"')
    path.write_text(text)
    section = JWT + 'jwks_file = "idp/jwks.json"\nheader = "X-Id-Token"\n'
    identifier = Identifier.from_config(load_config(with_identity(config_dir, section)))
    assert identifier.identity_headers == {b"x-org", b"x-user-id", b"x-user-role"}
    assert identifier.token_header == b"x-id-token"
    await identifier.start()
    try:
        token = IdentityProvider().token(key, iss="https://idp.test/", aud="gw", role=None)
        found = identifier.identify(
            b"", None, None, None, None, token.encode(), has_license=True, now=time.time()
        )
        assert isinstance(found, Identity)
        assert found.upstream_headers == b"X-Org: t1\r\nX-User-Id: u1\r\n"
    finally:
        await identifier.stop()
