"""RFC 9457 problem+json bodies: the one encoder for every answer the gateway gives itself
(the relay's refusals, the admin listener, the issuing service, the tenant endpoints).

A body is ``type``, ``title``, ``status``, ``code``, ``detail``, then the answer's own
fields, then ``request_id`` last. The request path encodes the part before the request id
once per distinct refusal (``problem_prefix``) and appends the id per request
(``with_request_id``), so a flood of identical refusals costs one bytes join each.

    body = problem_body(403, "role_forbidden", "Role not allowed", "...", request_id="r-1",
                        allowed_roles=["owner", "admin"])
    prefix = problem_prefix(401, "license_missing", "License required", "...")
    body = with_request_id(prefix, head.request_id or request_id())
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote

import msgspec

PROBLEM_TYPE: Final = "https://errors.gateway.local/"
PROBLEM_JSON: Final = b"application/problem+json"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

_json = msgspec.json.Encoder()
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+").fullmatch  # unreserved (RFC 3986): no quoting
_ID_PREFIX = f"{os.getpid():x}-{int(time.time()):x}-"
_LOW_DIGITS = [f"{low:02x}" for low in range(256)]


def _request_ids(block: int) -> list[str]:
    """Request ids ``256 * block`` to ``256 * block + 255`` (the first block from 1): one
    concatenation each, the high digits formatted once per block."""
    if block == 0:
        return [f"{_ID_PREFIX}{n:x}" for n in range(1, 256)]
    high = f"{_ID_PREFIX}{block:x}"
    return [high + low for low in _LOW_DIGITS]


# A request id unique to this process run (``<pid>-<start time>-<n>``, hex), one per
# request the relay reads. Formatting a counter per request (a Python call, an f-string's
# format spec) cost more than the rest of the id's life; taking the next of a block made
# ahead is one C-level call.
request_id: Final[Callable[[], str]] = itertools.chain.from_iterable(
    map(_request_ids, itertools.count())
).__next__


def problem_fields(
    status: int, code: str, title: str, detail: str = "", **fields: Any
) -> dict[str, Any]:
    """The body as a dict, in the order every answer uses (``request_id`` not included)."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": title,
        "status": status,
        "code": code,
        "detail": detail,
    }
    body.update(fields)
    return body


def problem_prefix(
    status: int, code: str, title: str, detail: str = "", *, last: str = "request_id", **fields: Any
) -> bytes:
    """The encoded body up to the request id: ``{..., "request_id":`` (cache it). With
    ``last = "upgrade"`` it ends before an ``upgrade`` link that names the request
    (``with_upgrade``)."""
    encoded = _json.encode(problem_fields(status, code, title, detail, **fields))
    return encoded[:-1] + b',"%s":' % last.encode()


def with_request_id(prefix: bytes, rid: str) -> bytes:
    """A ``problem_prefix`` completed with the request id (JSON-escaped, whatever it is)."""
    return prefix + _json.encode(rid) + b"}"


# ``with_upgrade``'s parts around the request id, for the caller to cache: the prefix with
# the link's start, the link's end up to the request id, and the prefix, upgrade URL and
# feature (for an id that needs quoting).
UpgradeParts = tuple[bytes, bytes, bytes, str, str]


def upgrade_parts(prefix: bytes, upgrade: str, feature: str) -> UpgradeParts:
    """For ``with_upgrade``: a ``problem_prefix(..., last="upgrade")`` and the upgrade
    link's URL and feature, with the link's fixed parts encoded once."""
    return (
        prefix + _link_start(upgrade),
        _link_end(feature) + b',"request_id":"',
        prefix,
        upgrade,
        feature,
    )


def with_upgrade(parts: UpgradeParts, rid: str) -> bytes:
    """An ``upgrade_parts`` body completed with the upgrade link of this request
    (``<upgrade>?from=<request id>&feature=<feature>``, so the page can highlight the
    feature and link the click to the block) and the request id."""
    if _URL_SAFE(rid):
        # The common case: an id of unreserved characters needs neither URL quoting nor
        # JSON escaping, so the body is bytes glued to parts encoded once (urlencode and
        # two JSON encodings per refusal were most of its cost).
        id_ = rid.encode()
        return parts[0] + id_ + parts[1] + id_ + b'"}'
    _, _, prefix, upgrade, feature = parts
    link = f"{upgrade}?from={quote(rid, safe='')}&feature={_quoted(feature)}"
    return prefix + _json.encode(link) + b',"request_id":' + _json.encode(rid) + b"}"


def _quoted(name: str) -> str:
    return name if _URL_SAFE(name) else quote(name, safe="")


# JSON escaping is per character: the encoded link is the encoded parts joined (each
# without the quotes it does not end with). Few distinct upgrade URLs and features.
@functools.lru_cache(maxsize=64)
def _link_start(upgrade: str) -> bytes:
    """``"<upgrade>?from=`` as JSON, open-ended."""
    return _json.encode(f"{upgrade}?from=")[:-1]


@functools.lru_cache(maxsize=1024)
def _link_end(feature: str) -> bytes:
    """``&feature=<feature>"`` as JSON, open-started."""
    return _json.encode(f"&feature={_quoted(feature)}")[1:]


def problem_body(
    status: int,
    code: str,
    title: str,
    detail: str = "",
    *,
    request_id: str | None = None,
    **fields: Any,
) -> bytes:
    """One complete body; ``request_id`` None leaves the field out (answers outside the
    request path: the admin listener, the issuing service)."""
    body = problem_fields(status, code, title, detail, **fields)
    if request_id is not None:
        body["request_id"] = request_id
    return _json.encode(body)


def problem(
    status: int, code: str, title: str, detail: str = "", **fields: Any
) -> tuple[bytes, str]:
    """A body with a fresh request id, and that id (for answers that have no request head)."""
    rid = request_id()
    return problem_body(status, code, title, detail, request_id=rid, **fields), rid
