"""HAR 1.2 recordings as HTTP/1.1 bytes: reading the file, the request a client sends, what
a classic hop may remove from it, and the recorded answer."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.har import (
    EntryProblem,
    HarError,
    HarRequest,
    HarResponse,
    WireRequest,
    classic_view,
    read_har,
    wire_request,
    wire_response,
)


def har_request(
    url: str = "http://ops.example/xdispatch/jobs",
    headers: list[tuple[str, str]] | None = None,
    method: str = "GET",
    post: dict[str, Any] | None = None,
) -> HarRequest:
    raw: dict[str, Any] = {
        "method": method,
        "url": url,
        "httpVersion": "HTTP/1.1",
        "headers": [{"name": n, "value": v} for n, v in (headers or [("Host", "ops.example")])],
    }
    if post is not None:
        raw["postData"] = post
    return msgspec.convert(raw, HarRequest)


# --------------------------------------------------------------------------- the file
@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"<html>", "not a HAR file: not JSON", id="not-json"),
        pytest.param(b"[1, 2]", "not a HAR file: no log.entries", id="not-an-object"),
        pytest.param(b'{"log": {"version": "1.2"}}', "no log.entries", id="no-entries"),
        pytest.param(
            b'{"log": {"version": "1.1", "entries": []}}', "HAR version '1.1'", id="version-1.1"
        ),
        pytest.param(b'{"log": {"entries": []}}', "HAR version '1.1'", id="version-missing"),
        pytest.param(
            b'{"log": {"version": "1.2", "entries": [{"request": {"method": "GET", '
            b'"url": "http://h/", "headers": [{"name": "A", "value": 1}]}}]}}',
            "at `$.log.entries[0].request.headers[0].value`",
            id="wrong-type",
        ),
        pytest.param(
            b'{"log": {"version": "1.2", "entries": [{"response": {"status": 200}}]}}',
            "missing required field `request`",
            id="no-request",
        ),
    ],
)
def test_a_file_that_is_not_a_har_1_2_recording_is_refused_with_the_reason(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "x.har"
    path.write_bytes(content)
    with pytest.raises(HarError) as caught:
        read_har(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_missing_file_is_a_har_error(tmp_path: Path) -> None:
    with pytest.raises(HarError, match="cannot read"):
        read_har(tmp_path / "absent.har")


def test_unknown_and_custom_fields_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "x.har"
    entry = {
        "_priority": "High",
        "request": {"method": "GET", "url": "http://h/", "headers": [], "comment": "x"},
    }
    path.write_text(json.dumps({"log": {"version": "1.2", "creator": {}, "entries": [entry]}}))
    assert read_har(path).log.entries[0].request.url == "http://h/"


# --------------------------------------------------------------------------- request bytes
def test_a_recorded_request_is_sent_as_recorded() -> None:
    request = har_request(
        "http://ops.example/xdispatch/orders?b=2&a=1",
        [("host", "ops.example"), ("X-Note", "two  spaces"), ("Content-Length", "2")],
        method="POST",
        post={"mimeType": "text/plain", "text": "hi"},
    )
    assert wire_request(request).to_bytes() == (
        b"POST /xdispatch/orders?b=2&a=1 HTTP/1.1\r\nhost: ops.example\r\n"
        b"X-Note: two  spaces\r\nContent-Length: 2\r\n\r\nhi"
    )


@pytest.mark.parametrize(
    ("url", "headers", "head"),
    [
        pytest.param(
            "http://ops.example:8080/x", [("Accept", "*/*")],
            b"GET /x HTTP/1.1\r\nHost: ops.example:8080\r\nAccept: */*\r\n\r\n",
            id="host-added-first-when-missing",
        ),
        pytest.param(
            "https://u:p@ops.example/x", [(":authority", "ops.example"), (":path", "/x")],
            b"GET /x HTTP/1.1\r\nHost: ops.example\r\n\r\n",
            id="http2-pseudo-headers-left-out",
        ),
        pytest.param(
            "http://ops.example?q=1#frag", [("Host", "h")],
            b"GET /?q=1 HTTP/1.1\r\nHost: h\r\n\r\n", id="no-path-and-a-fragment",
        ),
        pytest.param(
            "http://h/x", [("Host", "h"), ("X-Pad", " \tpadded\t ")],
            b"GET /x HTTP/1.1\r\nHost: h\r\nX-Pad: padded\r\n\r\n",
            id="surrounding-whitespace-is-not-part-of-a-value",
        ),
        pytest.param(
            "http://h/x", [("Host", "h"), ("X-Empty", "")],
            b"GET /x HTTP/1.1\r\nHost: h\r\nX-Empty: \r\n\r\n", id="empty-value",
        ),
        pytest.param(
            "http://h/x", [("Host", "h"), ("X-City", "Zürich")],
            "GET /x HTTP/1.1\r\nHost: h\r\nX-City: Zürich\r\n\r\n".encode(), id="utf8-value",
        ),
    ],
)  # fmt: skip
def test_request_head(url: str, headers: list[tuple[str, str]], head: bytes) -> None:
    assert wire_request(har_request(url, headers)).head() == head


def test_a_body_without_framing_gets_its_content_length() -> None:
    request = har_request(method="POST", post={"text": "abc"})
    sent = wire_request(request)
    assert sent.headers[-1] == (b"Content-Length", b"3")


def test_a_chunked_recording_is_sent_chunked() -> None:
    request = har_request(
        headers=[("Host", "h"), ("Transfer-Encoding", "chunked")],
        method="POST",
        post={"text": "abc"},
    )
    assert wire_request(request).to_bytes().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    empty = har_request(headers=[("Host", "h"), ("Transfer-Encoding", "chunked")], method="POST")
    assert wire_request(empty).to_bytes().endswith(b"chunked\r\n\r\n0\r\n\r\n")


def test_a_base64_body_is_decoded() -> None:
    body = bytes(range(256))
    post = {"mimeType": "application/octet-stream", "encoding": "base64"}
    request = har_request(method="PUT", post={**post, "text": base64.b64encode(body).decode()})
    assert wire_request(request).body == body


@pytest.mark.parametrize(
    ("url", "headers", "post", "message"),
    [
        pytest.param("ftp://h/x", [], None, "not an absolute http", id="not-http"),
        pytest.param("/relative", [], None, "not an absolute http", id="relative-url"),
        pytest.param("http:///x", [], None, "has no host", id="no-host"),
        pytest.param("http://h/caf\u00e9", [], None, "visible ASCII", id="non-ascii-target"),
        pytest.param("http://h/a b", [], None, "visible ASCII", id="space-in-target"),
        pytest.param("http://h/", [("X Y", "1")], None, "not an HTTP token", id="bad-name"),
        pytest.param(
            "http://h/", [("X-A\n", "1")], None, "not an HTTP token", id="newline-after-name"
        ),
        pytest.param("http://h/x\n", [], None, "visible ASCII", id="newline-after-target"),
        pytest.param(
            "http://h/", [("X-A", "\ud800")], None, "not encodable as UTF-8", id="lone-surrogate"
        ),
        pytest.param(
            "http://h/", [], {"text": "\udfff"}, "postData.text: not encodable", id="body-surrogate"
        ),
        pytest.param("http://h/", [("X", "a\r\nB: c")], None, "CR, LF or NUL", id="crlf-value"),
        pytest.param(
            "http://h/", [("Content-Length", "5")], {"text": "abc"},
            "Content-Length 5 but the recorded body has 3 bytes", id="length-mismatch",
        ),
        pytest.param(
            "http://h/", [("Content-Length", "3"), ("Content-Length", "3")], {"text": "abc"},
            "Content-Length 3, 3", id="two-lengths",
        ),
        pytest.param(
            "http://h/", [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
            {"text": "abc"}, "both Transfer-Encoding and Content-Length", id="te-and-cl",
        ),
        pytest.param(
            "http://h/", [("Transfer-Encoding", "gzip, chunked")], {"text": "abc"},
            "only chunked can be replayed", id="te-gzip",
        ),
        pytest.param(
            "http://h/", [], {"params": [{"name": "a", "value": "1"}]},
            "params but no text", id="params-only",
        ),
        pytest.param(
            "http://h/", [], {"text": "!!!", "encoding": "base64"}, "not base64", id="bad-base64"
        ),
        pytest.param(
            "http://h/", [], {"text": "x", "encoding": "quoted-printable"}, "only base64",
            id="unknown-encoding",
        ),
        pytest.param(
            "http://h/", [("Connection", "Upgrade"), ("Upgrade", "websocket")], None,
            "WebSocket upgrade", id="websocket",
        ),
    ],
)  # fmt: skip
def test_a_request_the_recording_does_not_hold_exactly_is_an_entry_problem(
    url: str, headers: list[tuple[str, str]], post: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(EntryProblem, match=message.replace("(", r"\(")):
        wire_request(har_request(url, headers, "POST", post))


def test_a_method_that_is_not_a_token_is_an_entry_problem() -> None:
    with pytest.raises(EntryProblem, match="not an HTTP token"):
        wire_request(har_request(method="GET /x"))


# --------------------------------------------------------------------------- classic view
def test_the_classic_view_removes_hop_by_hop_and_entitlement_headers_only() -> None:
    sent = WireRequest(
        "POST",
        "/xdispatch/x",
        (
            (b"Host", b"h"),
            (b"Connection", b"keep-alive, X-Trace, content-length, Host"),
            (b"X-Trace", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"PROXY-CONNECTION", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Sum"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic eA=="),
            (b"Proxy-Authenticate", b"Basic"),
            (b"X-Entitlement-Tier", b"enterprise"),
            (b"x_entitlement_tenant", b"other"),
            (b"X-Entitlements", b"kept: not the X-Entitlement- prefix"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Forwarded-For", b"10.0.0.1"),
        ),
        b"abc",
        chunked=True,
    )
    assert classic_view(sent).headers == (
        (b"Host", b"h"),
        (b"X-Entitlements", b"kept: not the X-Entitlement- prefix"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Forwarded-For", b"10.0.0.1"),
    )
    assert classic_view(sent).body == b"abc"


# --------------------------------------------------------------------------- the answer
def har_response(status: int, headers: list[tuple[str, str]], **content: str) -> HarResponse:
    raw = {
        "status": status,
        "statusText": "",
        "headers": [{"name": n, "value": v} for n, v in headers],
        "content": content,
    }
    return msgspec.convert(raw, HarResponse)


def test_the_recorded_answer_is_framed_by_its_decoded_body() -> None:
    response = har_response(
        200,
        [("Content-Type", "text/plain"), ("Content-Encoding", "gzip"), ("Content-Length", "99"),
         ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=b")],
        text="hello",
    )  # fmt: skip
    assert wire_response(response, "GET") == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=b\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    assert wire_response(response, "HEAD").endswith(b"Content-Length: 5\r\n\r\n")


@pytest.mark.parametrize(
    ("response", "method", "expected"),
    [
        pytest.param(None, "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="none"),
        pytest.param(
            har_response(0, []), "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            id="status-0",
        ),
        pytest.param(
            har_response(204, [("X-A", "1")], text="ignored"), "DELETE",
            b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", id="204-no-body",
        ),
        pytest.param(
            har_response(599, [], text="x"), "GET",
            b"HTTP/1.1 599 Unknown\r\nContent-Length: 1\r\n\r\nx", id="unknown-status",
        ),
        pytest.param(
            har_response(200, [], text="AAE=", encoding="base64"), "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\x00\x01", id="base64",
        ),
    ],
)  # fmt: skip
def test_recorded_answers(response: HarResponse | None, method: str, expected: bytes) -> None:
    assert wire_response(response, method) == expected
