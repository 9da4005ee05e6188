"""Fuzzing with hypothesis: nothing a client sends crashes the gateway or reaches an
upstream undecided.

(a) The license key parser: ``KeyRing.verify`` on arbitrary text, on strings made from
arbitrary bytes, on valid keys with characters flipped, inserted and deleted, and on
well-signed tokens with arbitrary JOSE headers and payloads, raises nothing but
``LicenseError`` (and a mutated key that still verifies carries the original claims).

(b) Raw request lines and header blocks (random methods, targets, versions, header names
and values from printable and control bytes) sent to a ``gateway serve`` subprocess: every
answer is a well-formed HTTP/1.1 response with a status below 500 or 502/503/504, or a clean
close; afterwards the process is healthy, logged no traceback, and its RSS stayed flat.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.enforcer import LicenseCache
from gateway.errors import LicenseError
from gateway.license import KeyRing, License
from gateway.matrix import APP_NAMES
from gateway.metrics import Metrics
from tests.conftest import IssueKey
from tests.harness import free_port, running_gateway, stop_process, write_config
from tests.provisioning import provision
from tests.rawhttp import LoopThread, RecordingUpstream, exchange_sync

REASONS = {"license_malformed", "license_unknown_key", "license_bad_signature"}

# ============================================================ (a) the key parser


def verify_or_license_error(keyring: KeyRing, token: str) -> License | None:
    try:
        return keyring.verify(token)
    except LicenseError as exc:
        assert exc.reason in REASONS, exc.reason
        return None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_verify_arbitrary_text(keyring: KeyRing, text: str) -> None:
    assert verify_or_license_error(keyring, text) is None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=4))
def test_verify_strings_made_of_arbitrary_bytes(keyring: KeyRing, parts: list[bytes]) -> None:
    joined = b".".join(parts)
    for token in (
        joined.decode("latin-1"),
        joined.decode("utf-8", "surrogateescape"),
        joined.decode("ascii", "ignore"),
    ):
        assert verify_or_license_error(keyring, token) is None


def test_header_that_is_not_utf8_is_malformed(keyring: KeyRing) -> None:
    """msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 inside a JSON
    string; it once escaped verify (and answered 500 on the provisioning hook)."""
    header = _b64(b'{"alg":"\x94"}')  # one byte that is not UTF-8, inside a JSON string
    token = f"{header}.e30.AAAA"
    with pytest.raises(LicenseError) as caught:
        keyring.verify(token)
    assert caught.value.reason == "license_malformed"


async def test_provisioning_a_key_that_is_not_utf8_is_400(
    tmp_path: Path, key_dir: Path, provision_secret: str
) -> None:
    header = _b64(b'{"alg":"\x94"}')
    body = {"event_id": "e1", "action": "license", "tenant": "t", "key": f"{header}.e30.AAAA"}
    async with (
        running_gateway(tmp_path, key_dir, dict.fromkeys(APP_NAMES, free_port())) as gw,
        aiohttp.ClientSession() as session,
    ):
        status, answer = await provision(session, gw, body)
    assert status == 400
    assert answer["code"] == "license_malformed"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), min_size=3, max_size=3))
@example([b'{"alg":"\x94"}', b"{}", b"sig"])
def test_verify_base64url_of_arbitrary_bytes(keyring: KeyRing, parts: list[bytes]) -> None:
    """Well-formed base64url whose content is junk: the parser's next layer."""
    assert verify_or_license_error(keyring, ".".join(_b64(part) for part in parts)) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_license_cache_resolves_any_header_bytes(keyring: KeyRing, raw: bytes) -> None:
    """What the proxy hands over: the raw header value, never decoded before."""
    cache = LicenseCache(keyring, Metrics())
    found = cache.resolve(raw)
    assert isinstance(found, LicenseError)
    assert found.reason in REASONS | {"license_check_busy"}
    again = cache.resolve(raw)
    assert isinstance(again, LicenseError) and again.reason == found.reason


EDIT_CHARS = st.sampled_from(
    list("AZaz09-_.=+/ ~%") + ["\x00", "\r", "\n", "\xe9", "\u202e", "\udcff"]
)
edits = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10_000), EDIT_CHARS),
    min_size=1,
    max_size=4,
)


def apply_edits(token: str, changes: list[tuple[str, int, str]]) -> str:
    chars = list(token)
    for op, position, char in changes:
        index = position % (len(chars) + 1)
        if op == "insert":
            chars.insert(index, char)
        elif chars:
            index %= len(chars)
            if op == "flip":
                chars[index] = char if chars[index] != char else "Q"
            else:
                del chars[index]
    return "".join(chars)


@pytest.fixture(scope="module")
def valid_key(issue_key: IssueKey) -> str:
    return issue_key(tier="fleet", addons=["sms_messaging"], sub="fuzz")


@settings(max_examples=400, deadline=None)
@given(changes=edits)
@example(changes=[("flip", 13, "Z")])  # the JOSE header's 14th character: invalid UTF-8
def test_verify_mutated_valid_keys(keyring: KeyRing, valid_key: str, changes: list[Any]) -> None:
    original = keyring.verify(valid_key)
    mutated = apply_edits(valid_key, changes)
    found = verify_or_license_error(keyring, mutated)
    if found is not None:
        # Only an edit the decoder cannot see (unused low bits of a final base64
        # character) may still verify, and then it says exactly what the key said.
        assert found.claims == original.claims
        assert found.kid == original.kid


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
jose_headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["EdDSA", "none", "HS256", "RS256", "ES256", "eddsa", "EdDSA "])
        | json_values,
        "kid": st.sampled_from(["test", "../test", "", "TEST", "test\x00"]) | json_values,
        "typ": st.sampled_from(["license+jwt", "JWT", ""]) | json_values,
        "crit": st.sampled_from([[], ["exp"], ["b64"]]) | json_values,
        "b64": st.booleans(),
        "jwk": json_values,
    },
)
claims = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "iss": st.just("fuzz"),
            "sub": st.text(max_size=10),
            "jti": st.text(max_size=10),
            "iat": st.integers(),
            "nbf": st.integers(),
            "exp": st.integers(),
            "tier": st.sampled_from(["core", "fleet", "enterprise", "", "platinum"]),
            "serial": st.integers(),
        },
        optional={"addons": json_values, "seats": json_values, "trial": json_values},
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=jose_headers, payload=claims)
def test_verify_signed_tokens_with_arbitrary_headers_and_claims(
    keyring: KeyRing, signing_key: Ed25519PrivateKey, header: Any, payload: Any
) -> None:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = _b64(signing_key.sign(signing_input.encode()))
    found = verify_or_license_error(keyring, f"{signing_input}.{signature}")
    if found is not None:
        assert header.get("alg") == "EdDSA" and header.get("kid") == "test"
        assert not header.get("crit")


# ============================================================ (b) raw requests


class GatewayProcess(NamedTuple):
    process: subprocess.Popen[bytes]
    listen: dict[str, int]
    admin: int
    log: Path


FUZZ_LIMITS = """
[server]
header_timeout = 0.3
body_timeout = 0.3
max_body_bytes = 100000
"""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def healthz(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=2) as response:
        status: int = response.status
        return status


@pytest.fixture(scope="module")
def upstream_thread() -> Iterator[RecordingUpstream]:
    loop = LoopThread()
    upstream = RecordingUpstream()
    try:
        loop.run(upstream.start())
        yield upstream
    finally:
        loop.run(upstream.stop())
        loop.close()


@pytest.fixture(scope="module")
def gateway_process(
    tmp_path_factory: pytest.TempPathFactory, key_dir: Path, upstream_thread: RecordingUpstream
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("fuzz-gateway")
    path, listen, admin = write_config(
        folder, key_dir, dict.fromkeys(APP_NAMES, upstream_thread.port), extra=FUZZ_LIMITS
    )
    log = folder / "gateway.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=folder,
            env={**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"},
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if healthz(admin) == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield GatewayProcess(process, listen, admin, log)
    finally:
        stop_process(process)


# A well-formed request first, then a few byte-level mutations: requests get past llhttp
# often enough to reach the enforcer, the upstream relay and every answer path.
JUNK = st.binary(min_size=1, max_size=8)
TOKENS = st.text(st.sampled_from("abcXYZ019-_"), min_size=1, max_size=12).map(str.encode)
SAFE = st.text(st.sampled_from("abcXYZ019-._~%/?=&;,:@!$'()*+"), max_size=16).map(str.encode)
METHODS = st.sampled_from(
    [b"GET"] * 4 + [b"POST"] * 4
    + [b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"PRI",
       b"M-SEARCH", b"PROPFIND"]
)  # fmt: skip
TARGETS = st.sampled_from(
    [b"/", b"*", b"/api/v1/shipments", b"/api/v1/shipments/1/optimize", b"/api/v1/health",
     b"/api/v1/jobs", b"/api/v1/me", b"http://h/api/v1/jobs", b"h:443", b"/xdispatch/orders",
     b"/_entitlements", b"/api/v1/../..", b"/%2e%2e/%2f", b"/a?b#c", b"/%C0%AF",
     b"/api/v1/shipments?x=%00", b"/api/v1//shipments/./1"]
) | SAFE.map(lambda raw: b"/api/v1/" + raw)  # fmt: skip
HEADERS = st.sampled_from(
    [(b"Connection", b"close"), (b"Connection", b"keep-alive"),
     (b"Connection", b"Upgrade, X-License-Key"), (b"Upgrade", b"websocket"),
     (b"Expect", b"100-continue"), (b"X-Tenant-Id", b"acme"), (b"X-User-Role", b"owner"),
     (b"X-User-Role", b"dispatch_only"), (b"X-Entitlement-Tier", b"enterprise"),
     (b"X-License-Key", b"ABCDE-12345-FGHIJ-67890-KLMNO"), (b"X-License-Key", b"{key}"),
     (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0"), (b"Content-Length", b"5"),
     (b"TE", b"trailers"), (b"Trailer", b"X-Entitlement-Tier"), (b"X-Forwarded-For", b"1.2.3.4"),
     (b"Keep-Alive", b"timeout=1"), (b"Proxy-Connection", b"keep-alive"),
     (b"Content-Type", b"application/json"), (b"Cookie", b"a=b")]
) | st.tuples(TOKENS.map(lambda name: b"X-" + name), SAFE)  # fmt: skip
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "bare-lf", "duplicate-line"]),
        st.integers(0, 1 << 16),
        JUNK | st.sampled_from([b"\r", b"\n", b"\x00", b" ", b":", b"\r\n", b"\r\n\r\n"]),
    ),
    max_size=3,
)


def mutate(raw: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    data = bytearray(raw)
    for op, position, junk in mutations:
        at = position % (len(data) + 1)
        if op == "replace" and data:
            data[at % len(data)] = junk[0]
        elif op == "insert":
            data[at:at] = junk
        elif op == "delete":
            del data[at : at + len(junk)]
        elif op == "bare-lf":
            found = data.find(b"\r\n", at)
            if found >= 0:
                del data[found]
        elif op == "duplicate-line":
            start = data.rfind(b"\r\n", 0, at) + 2
            end = data.find(b"\r\n", at)
            if 2 <= start < end:
                data[end + 2 : end + 2] = data[start : end + 2]
    return bytes(data)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    method = draw(METHODS)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [method + b" " + draw(TARGETS) + b" " + version, b"Host: gateway.test"]
    if draw(st.booleans()):
        lines.append(b"X-License-Key: {key}")
    lines += [name + b": " + value for name, value in draw(st.lists(HEADERS, max_size=5))]
    body = draw(st.binary(max_size=48))
    if draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(body))
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    return method, mutate(raw, draw(MUTATIONS))


def test_raw_requests_never_crash_the_gateway(
    gateway_process: GatewayProcess, issue_key: IssueKey
) -> None:
    port = gateway_process.listen["operations"]
    key = issue_key(tier="enterprise").encode()
    pid = gateway_process.process.pid

    def send(raw: bytes, head_only: bool = False) -> None:
        reply = exchange_sync(port, raw, deadline=5, head_only=head_only)
        if reply.status is None:
            assert not reply.raw, reply  # no answer at all: then a clean close
            return
        assert reply.status != 500, reply
        assert reply.status < 500 or reply.status in (502, 503, 504), reply
        assert reply.complete, reply

    # Warm-up (caches, pools, allocator), then the baseline.
    warm = [
        b"GET /api/v1/shipments HTTP/1.1\r\nHost: g\r\nX-License-Key: %s\r\n\r\n" % key,
        b"GET /api/v1/shipments/1/optimize HTTP/1.1\r\nHost: g\r\nX-License-Key: bad\r\n\r\n",
        b"GET /a%2Fb HTTP/1.1\r\nHost: g\r\n\r\n",
        b"BROKEN\r\n\r\n",
    ]
    for _ in range(50):
        for raw in warm:
            send(raw)
    baseline = rss_bytes(pid)

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(raw_requests())
    def fuzz(drawn: tuple[bytes, bytes]) -> None:
        method, raw = drawn
        send(raw.replace(b"{key}", key), head_only=method == b"HEAD")

    fuzz()
    for _ in range(50):
        for raw in warm:
            send(raw)
    assert gateway_process.process.poll() is None, "the gateway process died"
    assert healthz(gateway_process.admin) == 200
    growth = rss_bytes(pid) - baseline
    assert growth < 16 * 1024 * 1024, f"RSS grew by {growth / 1048576:.1f} MiB"
    log = gateway_process.log.read_text(errors="replace")
    for trouble in ("Traceback", "request handling failed", "Exception in callback", "Unhandled"):
        assert trouble not in log, log[-3000:]
