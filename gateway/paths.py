"""Canonical request paths: the one path the decision is made on and the upstream receives.

``canonical_path`` applies RFC 3986 dot-segment removal, merges repeated slashes and decodes
percent-encoded unreserved characters; whatever would stay ambiguous between the gateway and
an upstream (an encoded ``/`` ``\\`` ``%`` or ``;``, NUL and other control characters, ``;`` path
parameters, invalid or overlong UTF-8, dot segments above the root, targets that are not
origin-form) raises ``PathRejected`` (docs/design.md §5: 400 ``path_rejected``).

    canonical_path("/api/v1//shipments/%31/./optimize")  # "/api/v1/shipments/1/optimize"
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters allowed raw in a path (RFC 3986 pchar and "/", minus ";" which we refuse).
_RAW_OK = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@/%]*$")
_PERCENT = re.compile(r"%(?:([0-9A-Fa-f]{2})|(.{0,2}))", re.DOTALL)
# Decoded bytes that must never be hidden behind an encoding.
# An encoded ';' too: an upstream that decodes the path before it splits off path parameters
# would read one there, like the raw ';' refused above.
_FORBIDDEN_ENCODED = {
    0x2F: "encoded '/'",
    0x5C: "encoded '\\'",
    0x25: "encoded '%'",
    0x3B: "encoded ';'",
}


class PathRejected(ValueError):
    """A request target the gateway will not decide on; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def canonical_path(path: str) -> str:
    """Canonicalise the path part of an origin-form target (no query string)."""
    if not path.startswith("/"):
        raise PathRejected("not an origin-form request target")
    if not _RAW_OK.match(path):
        raise PathRejected(_explain_raw(path))
    if "%" in path:
        path = _decode(path)
    elif "/." not in path and "//" not in path:
        return path  # the common case: already canonical
    return _remove_dot_segments(path)


def _explain_raw(path: str) -> str:
    for char in path:
        if char == ";":
            return "';' path parameters"
        if char == "\\":
            return "backslash"
        if char == "?" or char == "#":
            return f"{char!r} in the path"
        if ord(char) < 0x20 or ord(char) == 0x7F:
            return "control character"
        if ord(char) > 0x7E:
            return "raw non-ASCII character"
        if not _RAW_OK.match(char):
            return f"character {char!r}"
    return "invalid character"


def _decode(path: str) -> str:
    """Decode unreserved escapes, upper-case the others, refuse the dangerous ones."""
    out: list[str] = []
    pending = bytearray()  # consecutive escaped bytes, checked as UTF-8 together
    position = 0
    for found in _PERCENT.finditer(path):
        if found.group(1) is None:
            raise PathRejected("malformed percent-encoding")
        if found.start() != position:
            _flush(pending, out)
            out.append(path[position : found.start()])
        position = found.end()
        value = int(found.group(1), 16)
        if value in _FORBIDDEN_ENCODED:
            raise PathRejected(_FORBIDDEN_ENCODED[value])
        if value < 0x20 or value == 0x7F:
            raise PathRejected("encoded control character")
        if value in _UNRESERVED and not pending:
            out.append(chr(value))
        else:
            if value in _UNRESERVED:
                _flush(pending, out)
                out.append(chr(value))
            else:
                pending.append(value)
    _flush(pending, out)
    out.append(path[position:])
    return "".join(out)


def _flush(pending: bytearray, out: list[str]) -> None:
    if not pending:
        return
    try:
        pending.decode("utf-8")  # strict: overlong forms and lone continuation bytes fail
    except UnicodeDecodeError as exc:
        raise PathRejected("invalid UTF-8 in percent-encoding") from exc
    out.append("".join(f"%{byte:02X}" for byte in pending))
    pending.clear()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 with merged slashes; '..' above the root is refused, not clamped."""
    segments = path.split("/")
    trailing = segments[-1] in ("", ".", "..") and len(segments) > 1
    result: list[str] = []
    for segment in segments[1:]:
        if segment == "" or segment == ".":
            continue
        if segment == "..":
            if not result:
                raise PathRejected("dot segments above the root")
            result.pop()
            continue
        result.append(segment)
    canonical = "/" + "/".join(result)
    if trailing and result:
        canonical += "/"
    return canonical
