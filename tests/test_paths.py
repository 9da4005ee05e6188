"""Canonical request paths (docs/design.md §5): one canonical form, or ``PathRejected`` (400)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.paths import PathRejected, canonical_path


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        pytest.param("/", "/", id="root"),
        pytest.param("/api/v1/shipments", "/api/v1/shipments", id="plain"),
        pytest.param("/a/./b", "/a/b", id="dot"),
        pytest.param("/a/../b", "/b", id="dot-dot"),
        pytest.param("/a/b/../../c", "/c", id="dot-dot-twice"),
        pytest.param("/a/..", "/", id="dot-dot-to-root"),
        pytest.param("/a/.", "/a/", id="trailing-dot-keeps-slash"),
        pytest.param("/a/b/..", "/a/", id="trailing-dot-dot-keeps-slash"),
        pytest.param("/./", "/", id="dot-at-root"),
        pytest.param("/.", "/", id="bare-dot"),
        pytest.param("/a/./../b/", "/b/", id="dots-mixed"),
        pytest.param("/a/%2e%2e/b", "/b", id="encoded-dot-dot-lower"),
        pytest.param("/a/%2E%2E/b", "/b", id="encoded-dot-dot-upper"),
        pytest.param("/a/.%2e/b", "/b", id="half-encoded-dot-dot"),
        pytest.param("/a/%2E/b", "/a/b", id="encoded-dot"),
        pytest.param("/a/.../b", "/a/.../b", id="three-dots-is-a-name"),
        pytest.param("/a/..b/c", "/a/..b/c", id="dot-dot-prefix-is-a-name"),
        pytest.param("//a", "/a", id="leading-double-slash"),
        pytest.param("///a//b", "/a/b", id="merged-slashes"),
        pytest.param("//", "/", id="double-slash-only"),
        pytest.param("/a/", "/a/", id="trailing-slash-kept"),
        pytest.param("/a//", "/a/", id="trailing-slashes-merged"),
        pytest.param("/%41", "/A", id="unreserved-letter-decoded"),
        pytest.param("/%61%62%63", "/abc", id="unreserved-run-decoded"),
        pytest.param("/%31/%7e/%7E/%2D%5F", "/1/~/~/-_", id="unreserved-marks-decoded"),
        pytest.param("/a%2e", "/a.", id="encoded-dot-in-name"),
        pytest.param("/caf%C3%A9", "/caf%C3%A9", id="utf8-kept-encoded"),
        pytest.param("/caf%c3%a9", "/caf%C3%A9", id="utf8-hex-upper-cased"),
        pytest.param("/%e2%82%ac/x", "/%E2%82%AC/x", id="utf8-three-bytes"),
        pytest.param("/%F0%9F%9A%9A", "/%F0%9F%9A%9A", id="utf8-four-bytes"),
        pytest.param("/caf%C3%A9%41", "/caf%C3%A9A", id="utf8-then-unreserved"),
        pytest.param("/a%3Fb", "/a%3Fb", id="encoded-question-mark-kept"),
        pytest.param("/a%23b", "/a%23b", id="encoded-hash-kept"),
        pytest.param("/a%3fb", "/a%3Fb", id="reserved-hex-upper-cased"),
        pytest.param("/a%20b", "/a%20b", id="encoded-space-kept"),
        pytest.param("/u/a:b@c!$&'()*+,=", "/u/a:b@c!$&'()*+,=", id="sub-delims-raw"),
    ],
)
def test_canonical(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/../a", id="dot-dot-above-root"),
        pytest.param("/a/../..", id="dot-dot-escapes"),
        pytest.param("/a/b/../../..", id="dot-dot-escapes-later"),
        pytest.param("/..", id="bare-dot-dot"),
        pytest.param("/%2e%2e/a", id="encoded-dot-dot-above-root"),
        pytest.param("/.%2E/", id="half-encoded-dot-dot-above-root"),
        pytest.param("/a/..%2Fb", id="dot-dot-encoded-slash"),
        pytest.param("/a/..%2f..%2fb", id="dot-dot-encoded-slash-lower"),
        pytest.param("/a%2Fb", id="encoded-slash"),
        pytest.param("/a%2fb", id="encoded-slash-lower"),
        pytest.param("/a%252Fb", id="double-encoded-slash"),
        pytest.param("/a%25", id="encoded-percent"),
        pytest.param("/a%5Cb", id="encoded-backslash"),
        pytest.param("/a%5cb", id="encoded-backslash-lower"),
        pytest.param("/a\\b", id="backslash"),
        pytest.param("/a\\..\\b", id="backslash-dot-dot"),
        pytest.param("/a;x=1", id="path-parameter"),
        pytest.param("/a/..;/b", id="dot-dot-semicolon"),
        pytest.param("/a%3Bb", id="encoded-semicolon"),
        pytest.param("/a/..%3b/b", id="encoded-semicolon-lower"),
        pytest.param("/a%00", id="encoded-nul"),
        pytest.param("/a%00.json", id="encoded-nul-truncation"),
        pytest.param("/a%0D%0ASet-Cookie:x", id="encoded-crlf"),
        pytest.param("/a%09", id="encoded-tab"),
        pytest.param("/a%7F", id="encoded-del"),
        pytest.param("/a\x00", id="raw-nul"),
        pytest.param("/a\r\nb", id="raw-crlf"),
        pytest.param("/a\x7f", id="raw-del"),
        pytest.param("/a\tb", id="raw-tab"),
        pytest.param("/a b", id="raw-space"),
        pytest.param("/a?b", id="raw-question-mark"),
        pytest.param("/a#b", id="raw-hash"),
        pytest.param('/a"b', id="raw-quote"),
        pytest.param("/a<b>", id="raw-angle-brackets"),
        pytest.param("/%C0%AF", id="overlong-slash"),
        pytest.param("/a%C0%AE%C0%AE/b", id="overlong-dots"),
        pytest.param("/a%E0%80%AF", id="overlong-three-bytes"),
        pytest.param("/a%C3", id="truncated-utf8"),
        pytest.param("/a%C3x", id="truncated-utf8-before-text"),
        pytest.param("/a%C3%41", id="truncated-utf8-before-unreserved"),
        pytest.param("/a%A9", id="lone-continuation-byte"),
        pytest.param("/a%ED%A0%80", id="utf8-surrogate"),
        pytest.param("/a%F4%90%80%80", id="utf8-above-max"),
        pytest.param("/a%FF", id="byte-ff"),
        pytest.param("/a%", id="percent-at-end"),
        pytest.param("/a%4", id="percent-one-digit"),
        pytest.param("/a%zz", id="percent-not-hex"),
        pytest.param("/caf\u00e9", id="raw-non-ascii"),
        pytest.param("/\u202e", id="raw-bidi-control"),
        pytest.param("http://h/p", id="absolute-form"),
        pytest.param("h:80", id="authority-form"),
        pytest.param("*", id="asterisk-form"),
        pytest.param("a/b", id="relative"),
        pytest.param("", id="empty"),
    ],
)
def test_rejected(raw: str) -> None:
    with pytest.raises(PathRejected) as caught:
        canonical_path(raw)
    assert caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_rejected_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="above the root"):
        canonical_path("/../etc/passwd")


# ---------------------------------------------------------------------------- property

SEGMENTS = (
    "a", "B", "z9", "-", "~", "_", ".", "..", "...", "", "%2e", "%2E", "%2e%2e", ".%2E",
    "%41", "%7e", "%c3%a9", "%C3%A9", "%e2%82%ac", "%20", "%3f", "%23", "%3B", "a:b@c",
    "!$&'()*+,=", "%2f", "%25", "%5c", "%00", "%C0%AF", "%c3", ";v=1", "\\",
)  # fmt: skip
segments = st.sampled_from(SEGMENTS) | st.text(alphabet="ab.%25cefCF/;~", max_size=6)
paths = st.builds(lambda parts: "/" + "/".join(parts), st.lists(segments, max_size=8))
_ESCAPE = re.compile(r"%(..)")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@settings(max_examples=500, deadline=None)
@given(paths)
@example("/a/%2e%2e/%2e/b/")
@example("/%2e%2e")
@example("/a/.%2e//%41/")
def test_canonical_form_is_stable(raw: str) -> None:
    try:
        canonical = canonical_path(raw)
    except PathRejected as exc:
        assert exc.reason
        return
    assert canonical_path(canonical) == canonical
    assert canonical.startswith("/")
    for fragment in ("//", "/./", "/../"):
        assert fragment not in canonical
    assert not canonical.endswith(("/.", "/.."))
    assert canonical.upper().count("%2F") == 0
    assert canonical.upper().count("%5C") == 0
    assert canonical.upper().count("%25") == 0
    for escape in _ESCAPE.findall(canonical):
        assert escape == escape.upper()  # hex upper-cased
        assert chr(int(escape, 16)) not in _UNRESERVED  # unreserved decoded
    # The trailing slash survives canonicalisation unless the path collapses to the root.
    dotted = raw.replace("%2e", ".").replace("%2E", ".")
    if canonical != "/":
        assert canonical.endswith("/") == dotted.endswith(("/", "/.", "/.."))
