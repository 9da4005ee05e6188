"""The pure framing functions: status lines, answers, and what reaches the upstream."""

from __future__ import annotations

import pytest

from gateway.proxy import framing


@pytest.mark.parametrize(
    ("status", "line"),
    [
        pytest.param(400, b"HTTP/1.1 400 Bad Request\r\n", id="400"),
        pytest.param(401, b"HTTP/1.1 401 Unauthorized\r\n", id="401"),
        pytest.param(408, b"HTTP/1.1 408 Request Timeout\r\n", id="408"),
        pytest.param(413, b"HTTP/1.1 413 Content Too Large\r\n", id="413"),
        pytest.param(414, b"HTTP/1.1 414 URI Too Long\r\n", id="414"),
        pytest.param(431, b"HTTP/1.1 431 Request Header Fields Too Large\r\n", id="431"),
        pytest.param(451, b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n", id="451"),
        pytest.param(504, b"HTTP/1.1 504 Gateway Timeout\r\n", id="504"),
        pytest.param(599, b"HTTP/1.1 599 \r\n", id="unassigned"),
    ],
)
def test_every_answer_carries_the_reason_phrase_of_its_status(status: int, line: bytes) -> None:
    """RFC 9110 phrases (Python before 3.13 still has the RFC 7231 ones for 413/414)."""
    answer = framing.answer(
        status, b"{}", b"application/problem+json", b"", close=False, request_id="r-1"
    )
    assert answer.startswith(line)
