"""``gateway replay``: cutting what an upstream received into requests, naming the first
differing byte, and the verb run on the shipped sample through a real gateway process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli import main
from gateway.har import WireRequest, classic_view, read_har, wire_request
from gateway.replay import MalformedRequest, Received, first_difference, split_request
from tests.conftest import IssueKey

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "docs" / "examples" / "classic.har"
Capture = pytest.CaptureFixture[str]


# --------------------------------------------------------------------------- split_request
@pytest.mark.parametrize(
    ("head", "framed_body", "body", "chunked"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"", b"", False, id="no-body"),
        pytest.param(
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\n", b"abc", b"abc", False, id="length"
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n",
            b"abc0123456789", True, id="chunked-with-extension-and-trailer",
        ),
    ],
)  # fmt: skip
def test_split_request(head: bytes, framed_body: bytes, body: bytes, chunked: bool) -> None:
    data = head + framed_body + b"GET /the-next-one HTTP/1.1\r\n"
    assert split_request(data) == (Received(head, body, chunked), len(head + framed_body))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\n", id="head-unfinished"),
        pytest.param(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab", id="body-unfinished"),
        pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab", id="chunk"),
        pytest.param(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", id="trailer"),
    ],
)
def test_an_unfinished_request_waits_for_more(data: bytes) -> None:
    assert split_request(data) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"GET /\r\n\r\n", "request line", id="request-line"),
        pytest.param(b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "header line", id="header-line"),
        pytest.param(
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "Content-Length", id="two-lengths",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", "Content-Length", id="signed-length"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n", "chunk size",
            id="hex-prefix",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n",
            "not followed by CRLF", id="chunk-overrun",
        ),
        pytest.param(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200_000, "1 MiB", id="endless-head"),
    ],
)  # fmt: skip
def test_bytes_that_are_no_http_request_are_malformed(data: bytes, message: str) -> None:
    with pytest.raises(MalformedRequest, match=message):
        split_request(data)


_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding")
)
_values = st.from_regex(r"[!-~]([ !-~]{0,20}[!-~])?", fullmatch=True)


@given(
    headers=st.lists(st.tuples(_names, _values), max_size=8),
    body=st.binary(max_size=300),
    chunked=st.booleans(),
)
def test_what_a_client_sends_splits_back_into_the_same_request(
    headers: list[tuple[str, str]], body: bytes, chunked: bool
) -> None:
    framing = (
        [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(len(body)))]
    )
    fields = tuple((n.encode(), v.encode()) for n, v in [("Host", "h"), *headers, *framing])
    sent = WireRequest("POST", "/x?y=1", fields, body, chunked)
    data = sent.to_bytes()
    assert split_request(data + b"GET /next HTTP/1.1\r\n") == (
        Received(sent.head(), body, chunked),
        len(data),
    )
    assert first_difference(sent, Received(sent.head(), body, chunked)) is None


# --------------------------------------------------------------------------- first_difference
EXPECTED = WireRequest(
    "POST", "/xdispatch/orders", ((b"Host", b"h"), (b"x-Trace", b"a b")), b"0123456789", False
)
HEAD = EXPECTED.head()


@pytest.mark.parametrize(
    ("head", "body", "fields"),
    [
        pytest.param(
            HEAD.replace(b"orders", b"Orders"), b"0123456789",
            {"part": "request line", "line": 1, "column": 16, "offset": 16,
             "expected": "POST /xdispatch/orders HTTP/1.1",
             "received": "POST /xdispatch/Orders HTTP/1.1", "caret": 16},
            id="request-line",
        ),
        pytest.param(
            HEAD.replace(b"x-Trace", b"X-Trace"), b"0123456789",
            {"part": "header", "line": 3, "column": 0, "offset": 42, "caret": 0,
             "message": "line 3 differs at byte 0 of the line"},
            id="header-case",
        ),
        pytest.param(
            HEAD.replace(b"x-Trace: a b\r\n", b""), b"0123456789",
            {"part": "header", "line": 3, "offset": 42, "expected": "x-Trace: a b",
             "received": None, "message": "line 3: the recorded header line did not arrive"},
            id="header-missing",
        ),
        pytest.param(
            HEAD[:-2] + b"X-Forwarded-For: 127.0.0.1\r\n\r\n", b"0123456789",
            {"part": "header", "line": 4, "offset": 56, "expected": None,
             "received": "X-Forwarded-For: 127.0.0.1"},
            id="header-added",
        ),
        pytest.param(
            HEAD, b"0123456x89",
            {"part": "body", "line": None, "column": 7, "offset": len(HEAD) + 7,
             "expected": "0123456789", "received": "0123456x89", "caret": 7,
             "message": "the body differs at byte 7 of 10"},
            id="body-byte",
        ),
        pytest.param(
            HEAD, b"01234",
            {"part": "body", "column": 5, "message": "the body ends after 5 of 10 bytes"},
            id="body-short",
        ),
        pytest.param(
            HEAD, b"0123456789\r\n",
            {"part": "body", "message": "the body has 2 bytes after the recorded ones",
             "received": "0123456789\\r\\n"},
            id="body-long",
        ),
    ],
)  # fmt: skip
def test_the_first_difference_is_named_to_the_byte(
    head: bytes, body: bytes, fields: dict[str, Any]
) -> None:
    found = first_difference(EXPECTED, Received(head, body, chunked=False))
    assert found is not None
    for name, value in fields.items():
        assert getattr(found, name) == value, name


# --------------------------------------------------------------------------- the verb
def gateway(*argv: str) -> subprocess.CompletedProcess[str]:
    """The installed command line in its own process, as an SRE runs it."""
    command = [sys.executable, "-m", "gateway.cli", "replay", *argv]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_shipped_classic_sample_passes_through_the_shipped_config() -> None:
    done = gateway(
        "--har", "docs/examples/classic.har", "--app", "operations", "--config", "gateway.toml"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("PASS ") for line in lines) == 16
    assert sum(line.startswith("SKIP ") and "(skipped: not classic)" in line for line in lines) == 2
    assert lines[-1] == (
        "classic regression suite (operations): 16 of 16 replayed requests passed (100.0%); "
        "0 failed, 0 not replayable, 2 skipped (not classic)"
    )
    assert "(classic key, recorded 404)" in done.stdout  # the recorded status, for information


def test_json_output_gives_each_entry_and_the_pass_rate() -> None:
    done = gateway("--har", str(SAMPLE), "--app", "operations", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["summary"] == {
        "replayed": 16, "passed": 16, "failed": 0, "errors": 0, "skipped": 2, "pass_rate": 1.0
    }  # fmt: skip
    first = report["entries"][0]
    assert first == {
        "entry": 0,
        "method": "GET",
        "url": "http://ops.xdispatch.example/xdispatch/jobs?status=open&sort=-created_at",
        "result": "pass",
        "classic": "path",
        "recorded_status": 200,
        "status": 200,
        "reason": None,
        "difference": None,
    }
    statuses = {e["entry"]: (e["recorded_status"], e["status"]) for e in report["entries"]}
    assert statuses[2] == (201, 201) and statuses[10] == (200, 200)
    assert report["entries"][16]["result"] == "skipped"
    assert report["entries"][16]["reason"] == "not classic"


def sample() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SAMPLE.read_text())
    return loaded


def set_header(entry: dict[str, Any], name: str, value: str) -> None:
    for header in entry["request"]["headers"]:
        if header["name"].lower() == name.lower():
            header["value"] = value


def test_a_request_that_reaches_the_upstream_changed_fails_naming_the_entry_and_byte(
    tmp_path: Path, config_dir: Path, issue_key: IssueKey
) -> None:
    """Entry 1 recorded with a signed license instead of its classic key: replayed with
    --all, the gateway rightly treats it as licensed traffic and adds headers, and the
    replay says where the upstream's bytes part from the recording."""
    har = sample()
    set_header(har["log"]["entries"][1], "X-License-Key", issue_key(tier="core"))
    altered = tmp_path / "altered.har"
    altered.write_text(json.dumps(har))
    argv = [
        "--har",
        str(altered),
        "--app",
        "operations",
        "--config",
        str(config_dir / "gateway.toml"),
    ]

    done = gateway(*argv, "--all")

    assert done.returncode == 1, done.stdout + done.stderr
    sent = wire_request(read_har(altered).log.entries[1].request)
    end_of_headers = len(classic_view(sent).head()) - 2
    expected_lines = len(classic_view(sent).headers) + 2
    report = done.stdout.split(
        "FAIL   entries[1]  GET http://ops.xdispatch.example/api/v1/shipments/42"
    )
    assert len(report) == 2, done.stdout
    detail = report[1].splitlines()
    assert detail[0] == "  (not classic, recorded 200)"
    assert detail[1] == (
        f"       line {expected_lines}: an extra header line arrived, not in the recording "
        f"(byte {end_of_headers} of the request)"
    )
    assert detail[2:4] == [
        "         expected: (nothing)",
        "         received: X-Forwarded-For: 127.0.0.1",
    ]
    assert done.stdout.splitlines()[-1].startswith(
        "classic regression suite (operations): 15 of 18 replayed requests passed (83.3%); 3 failed"
    )

    as_json = json.loads(gateway(*argv, "--all", "--json").stdout)
    difference = as_json["entries"][1]["difference"]
    assert difference["part"] == "header"
    assert difference["offset"] == end_of_headers
    assert difference["received"] == "X-Forwarded-For: 127.0.0.1"


def test_a_classic_request_the_gateway_refuses_fails_with_its_answer(tmp_path: Path) -> None:
    """A classic path recorded with a doubled slash: the gateway refuses non-canonical
    classic paths, so that client would break at rollout."""
    har = sample()
    entry = har["log"]["entries"][0]
    entry["request"]["url"] = entry["request"]["url"].replace("/xdispatch/jobs", "/xdispatch//jobs")
    altered = tmp_path / "altered.har"
    altered.write_text(json.dumps(har))

    done = gateway("--har", str(altered), "--app", "operations", "--config", "gateway.toml")

    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(
        "FAIL   entries[0]  GET http://ops.xdispatch.example/xdispatch//jobs"
    )
    assert lines[0].endswith("(classic path, recorded 200, answered 400)")
    assert (
        lines[1] == "       the upstream received nothing: the gateway answered 400 path_rejected"
    )
    assert "15 of 16 replayed requests passed (93.8%); 1 failed" in lines[-1]


# --------------------------------------------------------------------------- bad input
def write_har(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"log": {"version": "1.2", "entries": entries}}))
    return path


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    code = main(["replay", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_file_that_is_not_a_har_is_a_usage_error(capsys: Capture, tmp_path: Path) -> None:
    path = tmp_path / "x.har"
    path.write_text('{"log": {"version": "1.1", "entries": []}}')
    code, out, err = run(capsys, "--har", str(path), "--app", "operations")
    assert (code, out) == (2, "")
    assert err == (
        f"gateway: {path}: HAR version '1.1': gateway replay reads HAR 1.2 "
        "(export the recording again as HAR 1.2)\n"
    )


def test_nothing_classic_to_replay_is_a_usage_error(capsys: Capture, tmp_path: Path) -> None:
    entries = sample()["log"]["entries"][16:]
    code, out, err = run(
        capsys, "--har", str(write_har(tmp_path / "x.har", entries)), "--app", "operations",
        "--config", str(REPO / "gateway.toml"),
    )  # fmt: skip
    assert code == 2
    assert out.count("(skipped: not classic)") == 2
    assert "0 of 0 replayed requests passed (-)" in out
    assert "gateway: nothing replayed: no entry of" in err and "--all replays every entry" in err


def test_an_app_missing_from_the_config_is_a_usage_error(capsys: Capture, config_dir: Path) -> None:
    config = config_dir / "gateway.toml"
    text = config.read_text()
    config.write_text(re.sub(r"(?ms)^\[apps\.driver_app\].*?(?=^\[)", "", text))
    code, _, err = run(capsys, "--har", str(SAMPLE), "--app", "driver_app", "--config", str(config))
    assert code == 2
    assert err == f"gateway: {config} has no [apps.driver_app]: no listener to replay through\n"


def test_an_entry_that_cannot_be_replayed_fails_the_run_with_its_reason(
    capsys: Capture, tmp_path: Path
) -> None:
    good = sample()["log"]["entries"][0]
    bad = json.loads(json.dumps(sample()["log"]["entries"][2]))
    set_header(bad, "Content-Length", "999")
    path = write_har(tmp_path / "x.har", [good, bad])
    code, out, _ = run(
        capsys, "--har", str(path), "--app", "operations", "--config", str(REPO / "gateway.toml")
    )
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("PASS   entries[0]")
    assert lines[1] == (
        "ERROR  entries[1]  POST http://ops.xdispatch.example/xdispatch/orders  "
        "(not replayable: Content-Length 999 but the recorded body has 57 bytes)"
    )
    assert "1 of 2 replayed requests passed (50.0%); 0 failed, 1 not replayable" in lines[-1]


def test_a_bad_timeout_is_a_usage_error(capsys: Capture) -> None:
    code, _, err = run(capsys, "--har", str(SAMPLE), "--app", "operations", "--timeout", "0")
    assert code == 2 and "--timeout must be a positive" in err
