"""The states of one exchange (a request and its response) and their legal transitions.

    QUEUED ──▶ DECIDING ──▶ AWAIT_TENANT ──▶ DECIDING (again, with the record)
                  │
                  ├──▶ AWAIT_UPSTREAM ──▶ WAITING ──▶ RELAYING ──▶ DONE
                  │          ▲              │  │
                  │          └── (retry) ───┘  └──▶ TUNNEL (101)
                  ├──▶ COLLECTING (the body is read) ──▶ answered here
                  │
                  └──▶ answered here ──▶ DRAINING (rest of the body dropped) ──▶ DONE

An exchange is created QUEUED when its head is parsed; the client connection begins it when
it is first in line. ``NEXT`` lists the legal transitions; ``Exchange.to`` checks them.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    QUEUED = "queued"  # parsed; waits behind the exchange being answered
    DECIDING = "deciding"  # the enforcer decides (synchronous)
    AWAIT_TENANT = "await_tenant"  # a tenant record or classic key is being fetched
    COLLECTING = "collecting"  # answered here from the body: the body is being read
    AWAIT_UPSTREAM = "await_upstream"  # forwarded: a connection is opened or queued for
    WAITING = "waiting"  # the request went upstream; no final response head yet
    RELAYING = "relaying"  # the response head went to the client; its body streams
    DRAINING = "draining"  # answered before the request body ended: the rest is dropped
    DONE = "done"
    TUNNEL = "tunnel"  # 101: the connection is a byte tunnel now

    # Members are singletons: hash by identity in C, not Enum's Python-level hash of the
    # name (several set and dict look-ups per request).
    __hash__ = object.__hash__


QUEUED, DECIDING, AWAIT_TENANT, COLLECTING, AWAIT_UPSTREAM = (
    State.QUEUED,
    State.DECIDING,
    State.AWAIT_TENANT,
    State.COLLECTING,
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

NEXT: dict[State, frozenset[State]] = {
    QUEUED: frozenset({DECIDING}),
    DECIDING: frozenset({AWAIT_TENANT, COLLECTING, AWAIT_UPSTREAM, DRAINING, DONE}),
    AWAIT_TENANT: frozenset({DECIDING, DRAINING, DONE}),
    COLLECTING: frozenset({DRAINING, DONE}),
    AWAIT_UPSTREAM: frozenset({WAITING, DRAINING, DONE}),
    WAITING: frozenset({RELAYING, AWAIT_UPSTREAM, DRAINING, DONE}),
    RELAYING: frozenset({TUNNEL, DONE}),
    DRAINING: frozenset({DONE}),
    DONE: frozenset(),
    TUNNEL: frozenset(),
}
