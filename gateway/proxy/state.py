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
it is first in line. ``NEXT`` lists the legal transitions. The exchange changes state with a
plain slot store: checking each of the five or so transitions of every request cost ~2k
instructions per request (a call, a dict and a set look-up each). The test suite runs with
``check_transitions(Exchange)`` installed, which turns every store into a checked one, so
an illegal transition still fails the tests that reach it.
"""

from __future__ import annotations

import enum
from typing import Any


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


class IllegalTransition(AssertionError):
    """A store to ``state`` that ``NEXT`` does not allow (only raised where
    ``check_transitions`` is installed: the test suite)."""


class _CheckedState:
    """A data descriptor in place of a class's ``state`` slot: every store is checked
    against ``NEXT`` (the first one, from no state, must be QUEUED), then goes to the slot."""

    def __init__(self, slot: Any) -> None:
        self.slot = slot

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return self.slot.__get__(obj, owner)

    def __set__(self, obj: object, state: State) -> None:
        try:
            current = self.slot.__get__(obj, type(obj))
        except AttributeError:  # being created
            current = None
        legal = NEXT[current] if current is not None else frozenset({QUEUED})
        if state not in legal:
            raise IllegalTransition(f"{current} -> {state}")
        self.slot.__set__(obj, state)


def check_transitions(cls: type[Any]) -> None:
    """Check every store to ``cls.state`` (a ``__slots__`` class) against ``NEXT`` from now
    on, in this process: for the test suite, whose conftest installs it on ``Exchange``."""
    slot = cls.__dict__["state"]
    if not isinstance(slot, _CheckedState):
        cls.state = _CheckedState(slot)
