"""The audit trail: one hash-chained JSON line per licensing action, append-only.

Every issuance, provisioning, suspension, reinstatement, revocation, seat change and key
rotation appends a line (``AuditLog.append``). Each line carries a sequence number, the
SHA-256 of the previous line (``prev``) and its own SHA-256 (``hash``, over the line without
that field), so ``verify`` names the first line that was altered (its own hash no longer
matches), removed (a gap in ``seq``, ``prev`` pointing elsewhere) or moved (``seq`` going
back). Appenders in several processes take an exclusive ``flock`` on the file and read the
last line under it, so concurrent writers never fork the chain.

    log = AuditLog(Path("audit.jsonl"))
    log.append(AuditRecord(actor="alice", action="issue", tenant="acme", license_id=jti))
    problem = verify(Path("audit.jsonl"))     # None when intact, else AuditBreak(line, why)

A write that fails raises ``AuditError``: callers refuse the action rather than act
unrecorded. The chain proves order and integrity of what is in the file; cutting lines off
its end leaves a shorter valid chain (keep copies, e.g. ship the file to a log store).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.errors import LicenseError
from gateway.license import decode_unverified, fingerprint

if TYPE_CHECKING:
    from gateway.provision import ProvisionEvent

GENESIS = "0" * 64  # the ``prev`` of the first line
ACTIONS = (
    "issue",
    "provision",
    "suspend",
    "reinstate",
    "revoke",
    "seat_change",
    "key_rotate",
    "key_activate",
    "key_retire",
    "revocations_export",
    "migrate",
    "migrate_undo",
)
_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"}$')
_READ_BACK = 4096


class AuditError(OSError):
    """The audit log could not be written (or its last line is not a valid audit line)."""


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a caller records; ``AuditLog.append`` adds ``seq``, ``ts``, ``prev``, ``hash``."""

    actor: str
    action: str
    tenant: str | None = None
    license_id: str | None = None
    fingerprint: str | None = None  # of the license key (gateway.license.fingerprint)
    kid: str | None = None
    tier: str | None = None
    addons: tuple[str, ...] = ()
    reason: str | None = None  # ticket or free text (``--reason``)
    ref: str | None = None  # order id, provisioning event id
    detail: dict[str, Any] | None = None  # action-specific: serial, dates, outcome


class AuditLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line as written. Field order is the line's byte order (part of the hash)."""

    seq: int
    ts: str
    actor: str
    action: str
    tenant: str | None
    license_id: str | None
    fingerprint: str | None
    kid: str | None
    tier: str | None
    addons: tuple[str, ...]
    reason: str | None
    ref: str | None
    detail: dict[str, Any] | None
    prev: str
    hash: str = ""


_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(AuditLine)


def os_user() -> str:
    """The default actor of a CLI verb: the OS user running it."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary uids)
        return f"uid:{os.getuid()}"


def _timestamp(now: float) -> str:
    millis = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"


def encode_line(line: AuditLine) -> tuple[bytes, str]:
    """The line's bytes (no newline) and its ``hash``, computed over the rest of it."""
    body = _encoder.encode(msgspec.structs.replace(line, hash=""))
    # The hash is over the object without its "hash" member, then appended as the last one.
    body = body[: body.rindex(b',"hash":')] + b"}"
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}', digest


class AuditLog:
    """Appends to one file. Cheap to create; every ``append`` opens, locks and closes."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: AuditRecord, now: float | None = None) -> AuditLine:
        """Append one line under an exclusive lock; ``AuditError`` when it cannot be."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot open: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            if last is None:
                seq, prev = 1, GENESIS
            else:
                parsed = _parse(last)
                if parsed is None:
                    raise AuditError(
                        f"audit log {self.path}: the last line is not a valid audit line; "
                        f"run `gateway audit verify --log {self.path}` before writing more"
                    )
                seq, prev = parsed[0].seq + 1, parsed[0].hash
            line = AuditLine(
                seq=seq,
                ts=_timestamp(time.time() if now is None else now),
                prev=prev,
                **msgspec.structs.asdict(record),
            )
            data, digest = encode_line(line)
            written = os.write(fd, data + b"\n")
            if written != len(data) + 1:
                raise AuditError(f"audit log {self.path}: short write ({written} bytes)")
            os.fsync(fd)
            return msgspec.structs.replace(line, hash=digest)
        except AuditError:
            raise
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot write: {exc.strerror}") from exc
        finally:
            os.close(fd)  # also releases the lock


def _parse(data: bytes) -> tuple[AuditLine, bytes] | None:
    """A line and the bytes its hash covers, or None when it is not an audit line."""
    found = _TAIL.search(data)
    if found is None:
        return None
    try:
        return _line_decoder.decode(data), data[: found.start()] + b"}"
    except msgspec.DecodeError:
        return None


def _last_line(fd: int) -> bytes | None:
    """The last complete line of the file (without its newline), None when empty."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0:
        return None
    if os.pread(fd, 1, end - 1) != b"\n":
        raise AuditError("the audit log does not end with a newline (an interrupted write?)")
    tail = b""
    position = end - 1  # before the final newline
    while position > 0:
        start = max(0, position - _READ_BACK)
        tail = os.pread(fd, position - start, start) + tail
        position = start
        newline = tail.rfind(b"\n")
        if newline >= 0:
            return tail[newline + 1 :]
    return tail


@dataclass(frozen=True, slots=True)
class AuditBreak:
    """Where the chain breaks: the 1-based line number and what is wrong with it."""

    line: int
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}"


def verify(path: Path) -> tuple[int, AuditBreak | None]:
    """Check the whole chain; (lines read, the first break or None). ``OSError`` if unreadable."""
    previous_hash = GENESIS
    expected_seq = 1
    count = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            count = number
            if not raw.endswith(b"\n"):
                return count, AuditBreak(number, "incomplete line (no newline at the end)")
            parsed = _parse(raw[:-1])
            if parsed is None:
                return count, AuditBreak(number, "altered: not a valid audit line")
            line, body = parsed
            if hashlib.sha256(body).hexdigest() != line.hash:
                return count, AuditBreak(number, "altered: its content does not match its hash")
            if line.seq > expected_seq:
                missing = line.seq - expected_seq
                return count, AuditBreak(
                    number, f"{missing} line(s) removed before it (seq {line.seq}, expected "
                    f"{expected_seq})"
                )  # fmt: skip
            if line.seq < expected_seq:
                return count, AuditBreak(
                    number, f"reordered: seq {line.seq} after seq {expected_seq - 1}"
                )
            if line.prev != previous_hash:
                return count, AuditBreak(
                    number,
                    "removed, inserted or reordered: prev is not the hash of the line before",
                )
            previous_hash = line.hash
            expected_seq += 1
    return count, None


def read(path: Path) -> Iterator[AuditLine]:
    """Every parseable line, in file order (for ``audit show``; ``verify`` judges them)."""
    with path.open("rb") as handle:
        for raw in handle:
            try:
                yield _line_decoder.decode(raw.rstrip(b"\n"))
            except msgspec.DecodeError:
                continue


def provision_record(event: ProvisionEvent, applied: bool) -> AuditRecord:
    """The audit line of one provisioning call (``POST /admin/provision``)."""
    claims: dict[str, Any] = {}
    if event.key is not None:
        with contextlib.suppress(LicenseError):  # verified by the hook before this
            claims = decode_unverified(event.key)[1]
    addons = claims.get("addons")
    return AuditRecord(
        actor="provision-hook",
        action="provision" if event.action == "license" else event.action,
        tenant=event.tenant,
        license_id=event.license_id or claims.get("jti"),
        fingerprint=fingerprint(event.key) if event.key is not None else None,
        tier=claims.get("tier"),
        addons=tuple(addons) if isinstance(addons, list) else (),
        ref=event.event_id,
        detail={"applied": applied, **({"serial": claims["serial"]} if "serial" in claims else {})},
    )
