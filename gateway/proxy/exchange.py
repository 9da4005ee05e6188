"""One request/response pair on a client connection, as an explicit state machine.

    QUEUED ──▶ DECIDING ──▶ AWAIT_TENANT ──▶ DECIDING (again, with the record)
                  │
                  ├──▶ AWAIT_UPSTREAM ──▶ WAITING ──▶ RELAYING ──▶ DONE
                  │          ▲              │  │
                  │          └── (retry) ───┘  └──▶ TUNNEL (101)
                  │
                  └──▶ answered here ──▶ DRAINING (rest of the body dropped) ──▶ DONE

An exchange is created QUEUED when its head is parsed; the client connection begins it when
it is first in line. ``_NEXT`` lists the legal transitions and ``to`` is the only place that
changes the state. The other attributes are facts about the two messages' framing and
progress (how much body was held or sent), never "where are we" flags.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from time import perf_counter
from typing import TYPE_CHECKING

from gateway.enforcer import NEED_TENANT, PROBLEM_JSON, RESPOND, RequestHead, Verdict, problem
from gateway.proxy import framing
from gateway.proxy.flow import Pause
from gateway.proxy.request import RequestFraming

if TYPE_CHECKING:
    from gateway.proxy.client import Downstream
    from gateway.proxy.pool import Upstream

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class State(enum.Enum):
    QUEUED = "queued"  # parsed; waits behind the exchange being answered
    DECIDING = "deciding"  # the enforcer decides (synchronous)
    AWAIT_TENANT = "await_tenant"  # a tenant record or classic key is being fetched
    AWAIT_UPSTREAM = "await_upstream"  # forwarded: a connection is opened or queued for
    WAITING = "waiting"  # the request went upstream; no final response head yet
    RELAYING = "relaying"  # the response head went to the client; its body streams
    DRAINING = "draining"  # answered before the request body ended: the rest is dropped
    DONE = "done"
    TUNNEL = "tunnel"  # 101: the connection is a byte tunnel now


QUEUED, DECIDING, AWAIT_TENANT, AWAIT_UPSTREAM = (
    State.QUEUED,
    State.DECIDING,
    State.AWAIT_TENANT,
    State.AWAIT_UPSTREAM,
)
WAITING, RELAYING, DRAINING, DONE, TUNNEL = (
    State.WAITING,
    State.RELAYING,
    State.DRAINING,
    State.DONE,
    State.TUNNEL,
)

# Answered (here or by the upstream), fully or in part: another answer must not follow.
RESPONDED = frozenset({RELAYING, DRAINING, DONE, TUNNEL})
# The upstream is expected to send: the read timeout applies.
UPSTREAM_OWES = frozenset({WAITING, RELAYING})

_NEXT: dict[State, frozenset[State]] = {
    QUEUED: frozenset({DECIDING}),
    DECIDING: frozenset({AWAIT_TENANT, AWAIT_UPSTREAM, DRAINING, DONE}),
    AWAIT_TENANT: frozenset({DECIDING, DRAINING, DONE}),
    AWAIT_UPSTREAM: frozenset({WAITING, DRAINING, DONE}),
    WAITING: frozenset({RELAYING, AWAIT_UPSTREAM, DRAINING, DONE}),
    RELAYING: frozenset({TUNNEL, DONE}),
    DRAINING: frozenset({DONE}),
    DONE: frozenset(),
    TUNNEL: frozenset(),
}


class Exchange:
    """One request and its response (see the module docstring)."""

    __slots__ = (
        "downstream",
        "loop",
        "head",
        "framing",
        "state",
        "verdict",
        "upstream",
        "upstream_head",
        "body",
        "held",
        "body_bytes",
        "body_done",
        "body_sent",
        "chunked_out",
        "close_after",
        "retried",
        "task",
        "started",
        "last_activity",
    )

    def __init__(
        self,
        downstream: Downstream,
        head: RequestHead,
        request: RequestFraming,
        keep_alive: bool,
    ) -> None:
        self.downstream = downstream
        self.loop = downstream.loop
        self.head = head
        self.framing = request
        self.state = QUEUED
        self.verdict: Verdict | None = None
        self.upstream: Upstream | None = None
        self.upstream_head = b""
        self.body: list[bytes] = []  # request body received before the upstream is ready
        self.held = 0  # bytes in ``body``
        self.body_bytes = 0  # request body bytes received in all
        self.body_done = False
        self.body_sent = False  # some request body went upstream: no retry
        self.chunked_out = False  # the response body is chunked for the client
        self.close_after = not keep_alive  # close the client connection after the response
        self.retried = False
        self.task: asyncio.Task[None] | None = None
        self.started = perf_counter()
        self.last_activity = self.loop.time()

    def to(self, state: State) -> None:
        assert state in _NEXT[self.state], f"{self.state} -> {state}"
        self.state = state

    @property
    def response_started(self) -> bool:
        return self.state in RESPONDED

    # ------------------------------------------------------------ deciding
    def begin(self) -> None:
        self.to(DECIDING)
        down = self.downstream
        started = perf_counter()
        verdict = down.enforcer.check(self.head)
        down.decision_duration.observe(perf_counter() - started)
        if verdict.kind == NEED_TENANT:
            self.to(AWAIT_TENANT)
            self.task = self.loop.create_task(self._after_lookup())
            return
        self.dispatch(verdict)

    async def _after_lookup(self) -> None:
        down = self.downstream
        try:
            await down.enforcer.prefetch(self.head)
            self.task = None
            if not down.serving(self):
                return
            self.to(DECIDING)
            self.dispatch(down.enforcer.check(self.head, fetched=True))
        except Exception:  # a bug of ours or an unexpected store error: answer, never hang
            log.exception("tenant look-up failed")
            self.task = None
            if down.serving(self) and not self.response_started:
                self.answer_problem(500, "internal_error", "Internal gateway error", "rejected")

    def dispatch(self, verdict: Verdict) -> None:
        self.verdict = verdict
        if verdict.kind == RESPOND:
            self.answer(verdict.status, verdict.body, verdict.response_headers)
            return
        down = self.downstream
        self.upstream_head = framing.upstream_head(
            self.head,
            verdict,
            drop=self.framing.drop,
            upgrade=self.framing.upgrade,
            host=down.settings.host_header,
            peer=down.peer,
        )
        self.to(AWAIT_UPSTREAM)
        pool = down.pool
        conn = pool.take()
        if conn is not None:
            self.attach(conn)
        elif pool.can_open():
            self.task = self.loop.create_task(self._connect())
        else:
            self.task = self.loop.create_task(self._queue_for_connection())

    # ------------------------------------------------------------ to the upstream
    async def _queue_for_connection(self) -> None:
        """All upstream connections busy: wait (bounded) for one, else 503."""
        down = self.downstream
        pool = down.pool
        waiter = pool.wait()
        try:
            conn = await asyncio.wait_for(asyncio.shield(waiter), down.settings.queue_timeout)
        except TimeoutError:
            waiter.cancel()
            self.task = None
            down.metrics.upstream_errors["overloaded"].inc()
            body, _ = problem(
                503,
                "upstream_overloaded",
                "Upstream connection limit reached",
                f"app {down.enforcer.app}: all {down.settings.max_connections} connections busy",
            )
            self.answer(503, body, b"Retry-After: 1\r\n", outcome="upstream_error")
            return
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                pool.release(waiter.result())  # type: ignore[arg-type]
            waiter.cancel()
            raise
        self.task = None
        if not down.serving(self):
            if conn is not None:
                pool.release(conn)
            return
        if conn is None:
            self.task = self.loop.create_task(self._connect())
        else:
            self.attach(conn)

    async def _connect(self) -> None:
        down = self.downstream
        try:
            conn = await down.pool.connect()
        except TimeoutError:
            self.task = None
            self.upstream_error("timeout", 504, "Upstream connect timed out")
            return
        except OSError as exc:
            self.task = None
            log.debug("upstream connect failed: %s", exc)
            self.upstream_error("refused", 502, "Upstream refused the connection")
            return
        self.task = None
        if not down.serving(self):
            down.pool.release(conn)
            return
        self.attach(conn)

    def attach(self, conn: Upstream) -> None:
        """Send the head and whatever body arrived meanwhile; the rest streams."""
        conn.attach(self)
        chunks = self.take_body()
        if chunks:
            if self.framing.chunked:
                payload = b"".join(framing.chunk(c) for c in chunks)
            else:
                payload = b"".join(chunks)
            conn.send(self.upstream_head + payload)
            self.body_sent = True
        else:
            conn.send(self.upstream_head)
        if self.body_done and self.framing.chunked:
            conn.send(framing.LAST_CHUNK)
        self.last_activity = self.loop.time()
        self.to(WAITING)

    def take_body(self) -> list[bytes]:
        """The body held so far (sent or dropped by the caller); reading resumes if holding
        it was why it paused."""
        chunks = self.body
        if chunks:
            self.body = []
            if self.held > self.downstream.settings.max_buffer:
                self.downstream.flow.resume_reading(Pause.BUFFER_FULL)
            self.held = 0
        return chunks

    # ------------------------------------------------------------ request body
    def receive(self, body: bytes) -> None:
        """A piece of this request's body."""
        state = self.state
        if state is DRAINING or state is DONE:
            return
        upstream = self.upstream
        if upstream is not None and state in UPSTREAM_OWES:
            upstream.send(framing.chunk(body) if self.framing.chunked else body)
            self.body_sent = True
            self.last_activity = self.loop.time()  # the read timeout waits for uploads
            return
        self.body.append(body)
        self.body_bytes += len(body)
        self.held += len(body)
        if self.held > self.downstream.settings.max_buffer:
            self.downstream.flow.pause_reading(Pause.BUFFER_FULL)

    def body_end(self) -> None:
        self.body_done = True
        state = self.state
        if state is DRAINING:
            self.to(DONE)
            self.downstream.finished(self)
            return
        upstream = self.upstream
        if upstream is not None and state in UPSTREAM_OWES and self.framing.chunked:
            upstream.send(framing.LAST_CHUNK)

    # ------------------------------------------------------------ upstream → client
    def relay_interim(self, status: int, reason: bytes) -> None:
        if self.framing.version == "1.1":
            self.downstream.write(framing.interim_head(status, reason))

    def relay_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: list[bytes],
    ) -> None:
        down = self.downstream
        upstream = self.upstream
        assert upstream is not None
        if status == 101 and not self.framing.upgrade:
            # Only a WebSocket upgrade we forwarded may switch: any other 101 would make
            # this client connection a tunnel whose later requests go unchecked.
            self.upstream_failed("bad_response")
            return
        if self.framing.upgrade and status != 101:
            self.close_after = True  # the parser is in upgrade mode: this line cannot go on
        verdict = self.verdict
        out = framing.client_head(
            status,
            reason,
            headers,
            drop,
            version=self.framing.version,
            method=self.head.method,
            extra=verdict.response_headers if verdict is not None else b"",
            close=self.close_after or down.tracker.closing,
        )
        self.close_after = out.close
        self.chunked_out = out.chunked
        upstream.until_close = out.until_close
        self.to(RELAYING)
        down.write(out.head)
        if self.head.method == "HEAD":
            # httptools cannot be told a HEAD response has no body: finish here and do not
            # reuse the connection, whose parser would wait for that body.
            upstream.detach()
            self._count_forwarded()
            self._complete()

    def relay_body(self, body: bytes) -> None:
        self.downstream.write(framing.chunk(body) if self.chunked_out else body)

    def relay_end(self, reusable: bool) -> None:
        if self.chunked_out:
            self.downstream.write(framing.LAST_CHUNK)
        upstream = self.upstream
        if upstream is not None:
            # Never reuse what cannot be proved clean: a line that carried an upgrade or
            # CONNECT head, or whose request body did not go out whole, may still owe the
            # upstream bytes.
            upstream.detach(reusable and self.body_done and not self.framing.switching)
        self._count_forwarded()
        self._complete()

    def upgraded(self, rest: bytes) -> None:
        """The upstream answered 101: from now on both sides are a byte tunnel."""
        conn = self.upstream
        if conn is None:
            return
        down = self.downstream
        if not down.serving(self):
            conn.detach()
            return
        self.to(TUNNEL)
        self.upstream = None
        conn.open_tunnel()
        self._count_forwarded()
        down.metrics.duration.observe(perf_counter() - self.started)
        down.open_tunnel(conn, rest)

    def _count_forwarded(self) -> None:
        verdict = self.verdict
        if verdict is not None:
            self.downstream.metrics.outcome[verdict.outcome].inc()

    # ------------------------------------------------------------ upstream faults
    def upstream_failed(self, kind: str) -> None:
        conn = self.upstream
        if (
            kind == "reset"
            and conn is not None
            and conn.reused
            and self.state is WAITING
            and not self.retried
            and self.head.method in IDEMPOTENT
            and not self.body_sent
            and not self.body
        ):
            # A pooled connection the upstream had closed: retry once on a fresh one.
            self.retried = True
            conn.detach()
            self.to(AWAIT_UPSTREAM)
            self.task = self.loop.create_task(self._connect())
            return
        if conn is not None:
            conn.detach()
        status, title = (502, "Upstream closed the connection")
        if kind == "bad_response":
            title = "Upstream sent an invalid response"
        self.upstream_error(kind, status, title)

    def read_timeout(self) -> None:
        if self.upstream is not None:
            self.upstream.detach()
        self.upstream_error("timeout", 504, "Upstream did not answer in time")

    def upstream_error(self, kind: str, status: int, title: str) -> None:
        state = self.state
        if state is DRAINING or state is DONE or state is TUNNEL:
            return
        down = self.downstream
        down.metrics.upstream_errors[kind].inc()
        if state is RELAYING:
            # Part of the response is already out: the only honest signal is an abort.
            self.to(DONE)
            down.metrics.outcome["upstream_error"].inc()
            down.abort()
            return
        body, _ = problem(status, f"upstream_{kind}", title, f"app {down.enforcer.app}")
        self.answer(status, body, b"", outcome="upstream_error")

    # ------------------------------------------------------------ answering here
    def answer_problem(self, status: int, code: str, title: str, outcome: str) -> None:
        body, _ = problem(status, code, title)
        self.answer(status, body, b"", outcome=outcome)

    def answer(self, status: int, body: bytes, extra: bytes, outcome: str | None = None) -> None:
        """Write a complete problem+json response."""
        down = self.downstream
        self.take_body()  # dropped
        if self.framing.upgrade:
            # Refused here: what the client sends next is for a tunnel that never opens.
            self.close_after = True
        elif self.framing.expect_continue or not self.body_done:
            # The client may still send (or wait to send) a body we do not want; rather
            # than read a large one to the end, answer and close.
            if self.framing.expect_continue or self.body_bytes > down.settings.max_buffer:
                self.close_after = True
        if down.tracker.closing:
            self.close_after = True
        down.write(framing.answer(status, body, PROBLEM_JSON, extra, close=self.close_after))
        if outcome is not None:
            down.metrics.outcome[outcome].inc()
        self._complete(answered=True)

    def _complete(self, answered: bool = False) -> None:
        """The response is fully written."""
        down = self.downstream
        down.metrics.duration.observe(perf_counter() - self.started)
        if self.close_after or (not self.body_done and not answered):
            self.to(DONE)
            down.close()
            return
        if not self.body_done:
            self.to(DRAINING)  # the rest of the request body is read and dropped
            return
        self.to(DONE)
        down.finished(self)

    def abandon(self) -> None:
        """The client connection is gone."""
        if self.task is not None:
            self.task.cancel()
        if self.upstream is not None:
            self.upstream.detach()
