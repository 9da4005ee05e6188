"""Path confusion through the running gateway: it decides on exactly the path it forwards
(docs/design.md §5).

Every raw request target below goes over a plain socket to a real gateway in front of a
recording upstream. Each one is either refused with 400 (``path_rejected``, or
``bad_request`` where llhttp itself refuses the request line) and nothing reaches the
upstream, or the upstream receives exactly the canonical path (``canonical_path`` of the
target's path, plus the query untouched) and the decision was made on that path: a target
that canonicalises to a feature the Core plan lacks is blocked and never forwarded.

The raw-HTTP helpers (``RecordingUpstream``, ``exchange``, ``LoopThread``) are in
``tests/rawhttp.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.matrix import AppName, TierMatrix
from gateway.paths import PathRejected, canonical_path
from gateway.routes import RouteTable
from tests.conftest import GatewayFactory, IssueKey
from tests.harness import Gateway
from tests.rawhttp import (
    RecordingUpstream,
    ThreadedGateway,
    exchange,
    exchange_sync,
    request,
    threaded_gateway,
)

# ============================================================ fixtures


@pytest.fixture
async def recording_gateway(
    gateway_factory: GatewayFactory, upstream: RecordingUpstream
) -> Gateway:
    """The shipped configuration in front of the recording ``upstream``."""
    return await gateway_factory(upstream.port)


@pytest.fixture(scope="session")
def core_features(matrix: TierMatrix) -> frozenset[str]:
    return matrix.entitlement("core").features


# ============================================================ the table


class Case(NamedTuple):
    app: AppName
    method: str
    line: bytes  # the request line, without its CRLF
    status: int
    code: str | None  # the problem code of a 4xx answer
    upstream: str | None  # what the upstream must receive (forwarded cases)
    target: str | None  # the target the decision is made on (blocked / forwarded)


OPTIMIZE = "ops.basic_shipment_optimization"


def _line(method: str, target: str) -> bytes:
    return f"{method} {target} HTTP/1.1".encode("latin-1")


def blocked(target: str, method: str = "POST", app: AppName = "operations") -> Case:
    """Canonicalises to a route whose feature Core lacks: 403, never forwarded."""
    return Case(app, method, _line(method, target), 403, "feature_not_entitled", None, target)


def forwarded(target: str, upstream: str, method: str = "GET", app: AppName = "operations") -> Case:
    """Allowed for Core: the upstream receives exactly ``upstream``."""
    return Case(app, method, _line(method, target), 200, None, upstream, target)


def rejected(
    target: str, method: str = "POST", code: str = "path_rejected", line: bytes | None = None
) -> Case:
    """Refused with 400 before any decision; nothing reaches the upstream."""
    return Case("operations", method, line or _line(method, target), 400, code, None, None)


CASES = [
    # -- dot segments, slashes, decoded unreserved characters: canonicalised, then decided
    pytest.param(blocked("/api/v1/shipments/1/optimize"), id="baseline"),
    pytest.param(blocked("/api/v1//shipments/1/optimize"), id="double-slash"),
    pytest.param(blocked("//api/v1/shipments/1/optimize"), id="leading-double-slash"),
    pytest.param(blocked("///api///v1///shipments///1///optimize"), id="triple-slashes"),
    pytest.param(blocked("/api/v1/./shipments/1/./optimize"), id="dot-segments"),
    pytest.param(blocked("/api/v1/public/../shipments/1/optimize"), id="dot-dot"),
    pytest.param(blocked("/api/v1/health/../shipments/1/optimize"), id="public-route-dot-dot"),
    pytest.param(blocked("/api/v1/x/%2e%2e/shipments/1/optimize"), id="encoded-dot-dot"),
    pytest.param(blocked("/api/v1/x/%2E%2E/shipments/1/optimize"), id="encoded-dot-dot-upper"),
    pytest.param(blocked("/api/v1/x/.%2e/shipments/1/optimize"), id="half-encoded-dot-dot"),
    pytest.param(blocked("/api/v1/%2e/shipments/1/optimize"), id="encoded-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/"), id="trailing-slash"),
    pytest.param(blocked("/api/v1/shipments/1/optimize//"), id="trailing-double-slash"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/."), id="trailing-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/%2e"), id="trailing-encoded-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/x/.."), id="trailing-dot-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/../optimize"), id="dot-dot-back"),
    pytest.param(blocked("/api/v1/shipments/1/%6Fptimiz%65"), id="encoded-letters"),
    pytest.param(blocked("/%61%70%69/v1/shipments/%31/optimize"), id="encoded-prefix"),
    pytest.param(blocked("/api/v1/shipments/1%3F/optimize"), id="encoded-question-in-id"),
    pytest.param(blocked("/api/v1/shipments/1%23/optimize"), id="encoded-hash-in-id"),
    pytest.param(blocked("/api/v1/shipments/1/optimize?"), id="empty-query"),
    pytest.param(blocked("/api/v1/shipments/1/optimize?next=/api/v1/health"), id="query"),
    pytest.param(blocked("/api/v1/shipments/1/optimize?/../../health"), id="dots-in-query"),
    pytest.param(blocked("/api/v1/shipments/1/optimize", method="GET"), id="unlisted-method"),
    pytest.param(blocked("/api/v1/%73cans/./depot", app="driver_app"), id="driver-app"),
    pytest.param(
        blocked("/api/v1/orders/../branding/logo", method="GET", app="client_portal"),
        id="client-portal",
    ),
    # -- ambiguous encodings: refused, never forwarded
    pytest.param(rejected("/api/v1/public/..%2Fshipments/1/optimize"), id="dot-dot-encoded-slash"),
    pytest.param(rejected("/api/v1/public/..%2fshipments/1/optimize"), id="encoded-slash-lower"),
    pytest.param(rejected("/api/v1/shipments%2F1%2Foptimize"), id="encoded-slashes"),
    pytest.param(rejected("/api/v1/public/..%252Fshipments/1/optimize"), id="double-encoded"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%252F"), id="double-encoded-trailing"),
    pytest.param(rejected("/api/v1/shipments/1/%256Fptimize"), id="encoded-percent"),
    pytest.param(rejected("/api/v1/public/..%5Cshipments/1/optimize"), id="encoded-backslash"),
    pytest.param(rejected("/api/v1/public\\..\\shipments/1/optimize"), id="raw-backslash"),
    pytest.param(rejected("/api/v1/shipments/1/optimize;jsessionid=x"), id="path-parameter"),
    pytest.param(rejected("/api/v1/public/..;/shipments/1/optimize"), id="dot-dot-semicolon"),
    pytest.param(rejected("/api/v1/shipments;v=1/1/optimize"), id="mid-path-parameter"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%3Bv=1"), id="encoded-semicolon"),
    pytest.param(rejected("/api/v1/public/..%3b/shipments/1/optimize"), id="enc-semicolon-dots"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%00"), id="encoded-nul"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%00.json"), id="encoded-nul-suffix"),
    pytest.param(
        rejected("/api/v1/shipments/1/optimize%0D%0AX-Entitlement-Tier:%20enterprise"),
        id="encoded-crlf",
    ),
    pytest.param(rejected("/api/v1/shipments/1/optimize%0a"), id="encoded-lf"),
    pytest.param(rejected("/api/v1/public%C0%AF..%C0%AFshipments/1/optimize"), id="overlong-slash"),
    pytest.param(rejected("/api/v1/x/%C0%AE%C0%AE/shipments/1/optimize"), id="overlong-dots"),
    pytest.param(rejected("/api/v1/x/%E0%80%AE%E0%80%AE/shipments/1/optimize"), id="overlong-3"),
    pytest.param(rejected("/../api/v1/shipments/1/optimize"), id="above-root"),
    pytest.param(rejected("/api/v1/../../../shipments/1/optimize"), id="escapes-root"),
    pytest.param(rejected("/%2e%2e/api/v1/shipments/1/optimize"), id="encoded-above-root"),
    pytest.param(rejected("/api/v1/shipments/1/optimize#x"), id="raw-fragment"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%"), id="bare-percent"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%zz"), id="percent-not-hex"),
    # -- request targets that are not origin-form
    pytest.param(rejected("http://ops.example/api/v1/shipments/1/optimize"), id="absolute-form"),
    pytest.param(rejected("HTTP://ops.example//api/v1/shipments/1/optimize"), id="absolute-upper"),
    pytest.param(rejected("http://u@ops.example/api/v1/shipments/1/optimize"), id="absolute-user"),
    pytest.param(rejected("*", method="OPTIONS"), id="asterisk-form"),
    pytest.param(rejected("ops.example:443", method="CONNECT"), id="authority-form"),
    # -- request lines llhttp refuses itself
    pytest.param(rejected("/api/v1/shipments/1/opt\timize", code="bad_request"), id="raw-tab"),
    pytest.param(rejected("/api/v1/shipments/1/\xc3\xa9", code="bad_request"), id="raw-utf8"),
    pytest.param(rejected("/api/v1/shipments/1/optimize\x00", code="bad_request"), id="raw-nul"),
    pytest.param(rejected("/api/v1/shipments/1/opt\x7fimize", code="bad_request"), id="raw-del"),
    pytest.param(rejected("/api/v1/ship ments/1/optimize", code="bad_request"), id="raw-space"),
    pytest.param(
        rejected("", code="bad_request", line=b"POST /api/v1/shipments/1/optimize\rX HTTP/1.1"),
        id="raw-bare-cr",
    ),
    # -- a raw CRLF ends the request line: the decision is on what came before it
    pytest.param(
        Case(
            "operations",
            "POST",
            b"POST /api/v1/shipments/1/optimize\r\nX-Split: HTTP/1.1",
            403,
            "feature_not_entitled",
            None,
            "/api/v1/shipments/1/optimize",
        ),
        id="raw-crlf-splits-line",
    ),
    # -- forwarded: the upstream receives exactly the canonical form, query untouched
    pytest.param(forwarded("/api/v1/shipments/1", "/api/v1/shipments/1"), id="plain"),
    pytest.param(forwarded("/api/v1//shipments//1", "/api/v1/shipments/1"), id="merged"),
    pytest.param(forwarded("/api/v1/shipments/1/optimize/..", "/api/v1/shipments/1/"), id="up"),
    pytest.param(
        forwarded("/api/v1/shipments/./1/?a=1&b=%2F..%2F", "/api/v1/shipments/1/?a=1&b=%2F..%2F"),
        id="query-untouched",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize/../events", "/api/v1/shipments/1/events"),
        id="dot-dot-to-allowed",
    ),
    pytest.param(
        forwarded("/API/v1/shipments/1/optimize", "/API/v1/shipments/1/optimize", "POST"),
        id="case-variant-prefix",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/OPTIMIZE", "/api/v1/shipments/1/OPTIMIZE", "POST"),
        id="case-variant-last",
    ),
    pytest.param(
        forwarded("/Api/V1/Shipments/1/Optimize", "/Api/V1/Shipments/1/Optimize", "POST"),
        id="case-variant-mixed",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize%3F", "/api/v1/shipments/1/optimize%3F", "POST"),
        id="encoded-question-kept",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize%23x", "/api/v1/shipments/1/optimize%23x", "POST"),
        id="encoded-hash-kept",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize%2e", "/api/v1/shipments/1/optimize.", "POST"),
        id="encoded-trailing-dot-is-a-name",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/%c3%a9", "/api/v1/shipments/%C3%A9"), id="utf8-upper-cased"
    ),
    pytest.param(forwarded("/api/v1/shipments/%7e1", "/api/v1/shipments/~1"), id="tilde-decoded"),
    pytest.param(
        forwarded("/api/v1/jobs/1/../../me", "/api/v1/me", app="driver_app"), id="driver-dot-dot"
    ),
]


def _split(target: str) -> tuple[str, str]:
    path, mark, query = target.partition("?")
    return path, mark + query


@pytest.mark.parametrize("case", CASES)
async def test_request_target(
    case: Case,
    recording_gateway: Gateway,
    upstream: RecordingUpstream,
    issue_key: IssueKey,
    route_table: RouteTable,
    core_features: frozenset[str],
) -> None:
    reply = await exchange(
        recording_gateway.listen[case.app],
        request(case.line, key=issue_key(tier="core"), probe="p"),
    )
    assert reply.status == case.status, reply
    if case.code is not None:
        assert reply.code == case.code, reply
    if case.target is not None:
        # The table agrees with the canonicaliser and the route table.
        path, query = _split(case.target)
        canonical = canonical_path(path)
        found = route_table.match(case.app, case.method, canonical)
        feature = found.route.feature if found.route is not None else None
        gated = feature is not None and feature not in core_features
        assert gated == (case.status == 403), (canonical, feature)
        if case.status == 403:
            assert reply.problem()["feature"] == feature
        else:
            assert case.upstream == canonical + query
    if case.upstream is None:
        assert upstream.requests == [], "a refused or blocked request reached the upstream"
        return
    (seen,) = upstream.requests
    assert seen.complete
    assert seen.target == case.upstream
    assert seen.header("X-Entitlement-Tier") == ["core"]


# ============================================================ the property


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory, key_dir: Path) -> Iterator[ThreadedGateway]:
    """One gateway and upstream for every hypothesis example."""
    folder = tmp_path_factory.mktemp("paths-property")
    with threaded_gateway(folder, key_dir, RecordingUpstream()) as running:
        yield running


SEGMENTS = (
    "api", "v1", "shipments", "optimize", "itineraries", "plan", "phi", "events", "1", "42",
    ".", "..", "%2e", "%2E%2e", ".%2E", "", "%61pi", "optimiz%65", "x", "%2F", "%5c", ";a",
)  # fmt: skip
# Paths of gated routes, which noise below then tries to talk around.
SKELETONS = (
    ("api", "v1", "shipments", "1", "optimize"),
    ("api", "v1", "shipments", "1", "phi"),
    ("api", "v1", "shipments", "1"),
    ("api", "v1", "itineraries"),
    ("api", "v1", "itineraries", "7", "plan"),
    ("api", "v1", "phi", "records", "9"),
    ("api", "v1", "sms", "messages"),
)
NOISE = (".", "..", "%2e", "%2E%2e", "", "x", "%2F", ";a", "%6Fptimize", "%61pi", "1")


def _insert(skeleton: tuple[str, ...], noise: list[tuple[int, str]]) -> list[str]:
    parts = list(skeleton)
    for position, segment in noise:
        parts.insert(position % (len(parts) + 1), segment)
    return parts


noisy = st.builds(
    _insert,
    st.sampled_from(SKELETONS),
    st.lists(st.tuples(st.integers(0, 8), st.sampled_from(NOISE)), max_size=3),
)
targets = st.builds(
    lambda parts, slash, query: "/" + "/".join(parts) + slash + query,
    st.one_of(noisy, st.lists(st.sampled_from(SEGMENTS), max_size=7)),
    st.sampled_from(["", "/"]),
    st.sampled_from(["", "?a=1", "?next=%2F..%2Fx"]),
)
_probes = itertools.count()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=targets, method=st.sampled_from(["GET", "POST"]))
def test_decision_is_made_on_the_path_the_upstream_receives(
    threaded: ThreadedGateway,
    issue_key: IssueKey,
    route_table: RouteTable,
    core_features: frozenset[str],
    target: str,
    method: str,
) -> None:
    port = threaded.gateway.listen["operations"]
    upstream = threaded.upstream
    line = _line(method, target)
    path, query = _split(target)

    probe = f"enterprise-{next(_probes)}"
    reply = exchange_sync(port, request(line, key=issue_key(tier="enterprise"), probe=probe))
    if reply.status == 400:
        assert reply.code == "path_rejected", reply
        event("rejected")
        with pytest.raises(PathRejected):
            canonical_path(path)
        assert upstream.probed(probe) == []
        return
    assert reply.status == 200, reply
    (seen,) = upstream.probed(probe)
    assert seen.target == canonical_path(path) + query
    received = seen.target.partition("?")[0]
    found = route_table.match("operations", method, received)
    feature = found.route.feature if found.route is not None else None

    probe = f"core-{next(_probes)}"
    reply = exchange_sync(port, request(line, key=issue_key(tier="core"), probe=probe))
    if feature is not None and feature not in core_features:
        event(f"blocked for core: {feature}")
        assert reply.status == 403, reply
        assert reply.problem()["feature"] == feature
        assert upstream.probed(probe) == []
    else:
        event("allowed for core")
        assert reply.status == 200, reply
        (seen,) = upstream.probed(probe)
        assert seen.target.partition("?")[0] == received
