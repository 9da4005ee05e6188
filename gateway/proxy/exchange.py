"""One request/response pair on a client connection: decided by the enforcer, then
answered here or relayed to an upstream connection, and finished. Where it stands is its
``State`` (``state.py``, with the diagram), changed by a plain store to ``state``: the test
suite checks every store against the legal transitions (``state.check_transitions``), the
request path pays nothing for it. The other attributes are facts about the two messages'
framing and progress (how much body was held or sent, how much response written), never
"where are we" flags.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Protocol, cast

from gateway.enforcer import (
    CLASSIC,
    COLLECT,
    NEED_TENANT,
    PROBLEM_JSON,
    RESPOND,
    RequestHead,
    Verdict,
)
from gateway.proxy import framing
from gateway.proxy.flow import Pause
from gateway.proxy.request import RequestFraming
from gateway.proxy.state import (
    AWAIT_TENANT,
    AWAIT_UPSTREAM,
    COLLECTING,
    DECIDING,
    DONE,
    DRAINING,
    QUEUED,
    RELAYING,
    RESPONDED,
    TUNNEL,
    UPSTREAM_OWES,
    WAITING,
)

if TYPE_CHECKING:
    from gateway.proxy.client import Downstream
    from gateway.proxy.pool import Upstream

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Answering(Protocol):
    """``Enforcer.answer``: the answer to a COLLECT verdict, from the request body."""

    def answer(self, head: RequestHead, body: bytes) -> Verdict: ...


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
        "request_id_line",
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
        "sent",
        "status",
        "upstream_status",
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
        # The X-Request-Id line sent upstream and back to the client (empty: classic)
        self.request_id_line = b""
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
        self.last_activity = 0.0  # (read only once attached: attach sets it)
        self.sent = 0  # response bytes written to the client
        self.status = 0  # of the final response, once known
        self.upstream_status: int | None = None  # None: answered here

    @property
    def response_started(self) -> bool:
        return self.state in RESPONDED

    def write(self, data: bytes) -> None:
        """To the client, counted for the access log."""
        self.sent += len(data)
        self.downstream.write(data)

    # ------------------------------------------------------------ deciding
    def begin(self) -> None:
        self.state = DECIDING
        down = self.downstream
        started = perf_counter()
        verdict = down.enforcer.check(self.head)
        down.decision_duration.observe(perf_counter() - started)
        if verdict.kind == NEED_TENANT:
            self.state = AWAIT_TENANT
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
            self.state = DECIDING
            self.dispatch(down.enforcer.check(self.head, fetched=True))
        except Exception:  # a bug of ours or an unexpected store error: answer, never hang
            log.exception("tenant look-up failed")
            self.task = None
            if down.serving(self) and not self.response_started:
                self.answer_problem(500, "internal_error", "Internal gateway error", "rejected")

    def dispatch(self, verdict: Verdict) -> None:
        self.verdict = verdict
        down = self.downstream
        if verdict.close:
            self.close_after = True
        kind = verdict.kind
        if kind == RESPOND:
            if verdict.status == 401 and self.head.license_key is not None and down.key_refused():
                self.close_after = True
            self.answer(verdict.status, verdict.body, verdict.response_headers)
            return
        if kind == COLLECT:
            self._collect()
            return
        head = self.head
        if kind != CLASSIC:
            self.request_id_line = b"X-Request-Id: %s\r\n" % head.request_id.encode()
        self.upstream_head = framing.upstream_head(
            head,
            verdict,
            drop=self.framing.drop,
            upgrade=self.framing.upgrade,
            host=down.settings.host_header,
            request_id_line=self.request_id_line,
        )
        self.state = AWAIT_UPSTREAM
        down.pool.provide(self)

    # ------------------------------------------------------------ answered from the body
    def _collect(self) -> None:
        verdict = self.verdict
        assert verdict is not None
        self.state = COLLECTING
        if self.held > self.downstream.settings.max_buffer:
            # Held while deciding; the verdict's max_body bounds it from here on.
            self.downstream.flow.resume_reading(Pause.BUFFER_FULL)
        if self.body_bytes > verdict.max_body:
            self._collect_too_large()
        elif self.body_done:
            self._collected()
        elif self.framing.expect_continue:
            self.write(CONTINUE)  # the client waits for this before sending the body

    def _collect_too_large(self) -> None:
        self.close_after = True  # the rest of the body is not read
        self.answer_problem(413, "body_too_large", "Request body too large", "rejected")

    def _collected(self) -> None:
        body = b"".join(self.take_body())
        try:
            # Enforcer.answer (tenant-facing endpoints) lands with the enforcer split.
            verdict = cast(Answering, self.downstream.enforcer).answer(self.head, body)
        except Exception:  # a bug of ours: answer, never hang
            log.exception("answering a collected request failed")
            self.answer_problem(500, "internal_error", "Internal gateway error", "rejected")
            return
        self.verdict = verdict
        if verdict.close:
            self.close_after = True
        self.answer(verdict.status, verdict.body, verdict.response_headers)

    # ------------------------------------------------------------ to the upstream
    def attach(self, conn: Upstream) -> None:
        """Send the head and whatever body arrived meanwhile; the rest streams."""
        conn.attach(self)
        if self.body:  # (most requests: nothing held, no take_body call)
            chunks = self.take_body()
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
        self.state = WAITING

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
        if state is COLLECTING:
            assert self.verdict is not None
            if self.body_bytes > self.verdict.max_body:
                self._collect_too_large()
        elif self.held > self.downstream.settings.max_buffer:
            self.downstream.flow.pause_reading(Pause.BUFFER_FULL)

    def body_end(self) -> None:
        self.body_done = True
        state = self.state
        if state is DRAINING:
            self.state = DONE
            self.downstream.finished(self)
        elif state is COLLECTING:
            self._collected()
        elif self.framing.chunked and self.upstream is not None and state in UPSTREAM_OWES:
            self.upstream.send(framing.LAST_CHUNK)

    # ------------------------------------------------------------ upstream → client
    def relay_interim(self, status: int, reason: bytes) -> None:
        if self.framing.version == "1.1":
            self.write(framing.interim_head(status, reason))

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
        assert verdict is not None
        head, self.chunked_out, upstream.until_close, self.close_after = framing.client_head(
            status,
            reason,
            headers,
            drop,
            version=self.framing.version,
            method=self.head.method,
            extra=verdict.response_headers,
            close=self.close_after or down.tracker.closing,
            request_id_line=self.request_id_line,
        )
        self.status = self.upstream_status = status
        self.state = RELAYING
        self.sent += len(head)  # self.write, inline (as in relay_body): per response
        down.write(head)
        if self.head.method == "HEAD":
            # httptools cannot be told a HEAD response has no body: finish here and do not
            # reuse the connection, whose parser would wait for that body.
            upstream.detach()
            self._complete(verdict.outcome)

    def relay_body(self, body: bytes) -> None:
        if self.chunked_out:
            body = framing.chunk(body)
        self.sent += len(body)
        self.downstream.write(body)

    def relay_end(self, reusable: bool) -> None:
        if self.chunked_out:
            self.write(framing.LAST_CHUNK)
        upstream = self.upstream
        if upstream is not None:
            # Never reuse what cannot be proved clean: a line that carried an upgrade or
            # CONNECT head, or whose request body did not go out whole, may still owe the
            # upstream bytes.
            upstream.detach(reusable and self.body_done and not self.framing.switching)
        assert self.verdict is not None
        self._complete(self.verdict.outcome)

    def upgraded(self, rest: bytes) -> None:
        """The upstream answered 101: from now on both sides are a byte tunnel."""
        conn = self.upstream
        if conn is None:
            return
        down = self.downstream
        if not down.serving(self):
            conn.detach()
            return
        self.state = TUNNEL
        self.upstream = None
        conn.open_tunnel()
        assert self.verdict is not None
        down.metrics.outcome[self.verdict.outcome].inc()
        self._finished(self.verdict.outcome)
        down.open_tunnel(conn, rest)

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
            self.state = AWAIT_UPSTREAM
            self.downstream.pool.open_for(self)
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

    def upstream_error(
        self, kind: str, status: int, title: str, detail: str = "", extra: bytes = b""
    ) -> None:
        state = self.state
        if state is DRAINING or state is DONE or state is TUNNEL:
            return
        down = self.downstream
        down.metrics.upstream_errors[kind].inc()
        if state is RELAYING:
            # Part of the response is already out: the only honest signal is an abort.
            down.report("upstream_error", f"upstream_{kind}", None, self.head.request_id, self.head)
            self.state = DONE
            down.metrics.outcome["upstream_error"].inc()
            self._finished("upstream_error")
            down.abort()
            return
        detail = detail or f"app {down.enforcer.app}"
        body = framing.problem_body(status, f"upstream_{kind}", title, detail, self.head.request_id)
        down.report("upstream_error", f"upstream_{kind}", status, self.head.request_id, self.head)
        self.answer(status, body, extra, outcome="upstream_error")

    # ------------------------------------------------------------ answering here
    def answer_problem(self, status: int, code: str, title: str, outcome: str) -> None:
        body = framing.problem_body(status, code, title, "", self.head.request_id)
        self.downstream.report("request_rejected", code, status, self.head.request_id, self.head)
        self.answer(status, body, b"", outcome=outcome)

    def answer(self, status: int, body: bytes, extra: bytes, outcome: str | None = None) -> None:
        """Write a complete response: the verdict's (its content type, problem+json by
        default), or the problem+json of an ``outcome`` the proxy counts itself."""
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
        verdict = self.verdict
        content_type = verdict.content_type if outcome is None and verdict else PROBLEM_JSON
        self.status = status
        self.write(
            framing.answer(
                status,
                body,
                content_type,
                extra,
                close=self.close_after,
                request_id=self.head.request_id,
            )
        )
        if outcome is not None:
            down.metrics.outcome[outcome].inc()
        self._complete(outcome, answered=True)

    def _complete(self, outcome: str | None, answered: bool = False) -> None:
        """The response is fully written."""
        if not answered:
            assert outcome is not None
            self.downstream.metrics.outcome[outcome].n += 1  # Tally.inc, inlined: per response
        self._finished(outcome)
        down = self.downstream
        if self.close_after or (not self.body_done and not answered):
            self.state = DONE
            down.close()
            return
        if not self.body_done:
            self.state = DRAINING  # the rest of the request body is read and dropped
            return
        self.state = DONE
        down.finished(self)

    def _finished(self, outcome: str | None) -> None:
        """The response is out (or, for a tunnel, its 101): timed, and logged."""
        down = self.downstream
        duration = perf_counter() - self.started
        down.metrics.duration.observe(duration)
        if down.access_log is not None:
            down.log_access(self, outcome, duration)

    def abandon(self) -> None:
        """The client connection is gone."""
        if self.task is not None:
            self.task.cancel()
        if self.upstream is not None:
            self.upstream.detach()
