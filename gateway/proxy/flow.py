"""Flow control of one client connection: why reading is paused, and whether writing is.

Reading from the client pauses for several independent reasons (the upstream's write buffer
is full, a request body is held while no upstream is ready, too many pipelined requests,
bytes held while an upgrade waits for its 101). They combine: reading resumes only when no
reason is left, so lifting one never undoes another (uvicorn's ``flow_control.py`` has one
flag; a relay needs the reasons).

Writing to the client pauses when its transport's buffer is full; then the upstream joined
to this connection (the one relaying a response, or the other end of a tunnel) stops being
read, and an upstream joined later starts out paused.

    flow = FlowControl(transport)
    flow.pause_reading(Pause.PIPELINE)
    flow.pause_reading(Pause.UPSTREAM_FULL)
    flow.resume_reading(Pause.PIPELINE)        # still paused: the upstream is full
"""

from __future__ import annotations

import asyncio
from typing import Final


class Pause:
    """Why reading from the client is paused: bits that combine. Plain ints rather than an
    ``enum.IntFlag``, whose operators run in Python (~0.6 µs each, on every request)."""

    UPSTREAM_FULL: Final = 1  # the joined upstream's write buffer is over its high-water mark
    BUFFER_FULL: Final = 2  # a request body held for an upstream not yet ready is over max_buffer
    PIPELINE: Final = 4  # more pipelined requests queued than MAX_PIPELINE
    UPGRADE: Final = 8  # bytes after an upgrade head, held until the 101, over UPGRADE_HIGH_WATER
    REFUSED: Final = 16  # a malformed request was read: nothing after it is (never lifted)


NOT_PAUSED: Final = 0


class FlowControl:
    """One per client connection (see the module docstring)."""

    __slots__ = ("transport", "paused", "write_paused", "peer")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.paused = NOT_PAUSED  # the reasons (Pause bits) reading is paused for
        self.write_paused = False
        self.peer: asyncio.Transport | None = None  # the joined upstream's transport

    def pause_reading(self, reason: int) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    def join(self, peer: asyncio.Transport, peer_write_paused: bool) -> None:
        """An upstream now writes to this client and reads from it: while this client is
        not reading, the upstream is not read either, from its first byte on."""
        self.peer = peer
        if self.write_paused and not peer.is_closing():
            peer.pause_reading()
        if peer_write_paused:
            self.pause_reading(Pause.UPSTREAM_FULL)

    def part(self) -> None:
        """The joined upstream is gone (released to the pool or closed): it is read again
        by whoever takes it next, and its full buffer no longer holds this client back."""
        peer, self.peer = self.peer, None
        if peer is not None and self.write_paused and not peer.is_closing():
            peer.resume_reading()
        if self.paused & Pause.UPSTREAM_FULL:  # rarely: no call on every response
            self.resume_reading(Pause.UPSTREAM_FULL)
