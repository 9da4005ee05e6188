"""The exchange's states (gateway.proxy.state): the request path stores them unchecked, and
the test suite checks every store against ``NEXT`` (installed by tests/conftest.py)."""

from __future__ import annotations

import pytest

from gateway.proxy.exchange import Exchange
from gateway.proxy.state import (
    AWAIT_UPSTREAM,
    DECIDING,
    DONE,
    DRAINING,
    NEXT,
    QUEUED,
    RELAYING,
    WAITING,
    IllegalTransition,
    State,
    check_transitions,
)


def _exchange() -> Exchange:
    # Only the state slot is exercised: no connection behind it.
    return Exchange.__new__(Exchange)


def test_the_suite_checks_every_state_store() -> None:
    ex = _exchange()
    for state in (QUEUED, DECIDING, AWAIT_UPSTREAM, WAITING, RELAYING, DONE):
        ex.state = state
    assert ex.state is DONE
    check_transitions(Exchange)  # installing it twice changes nothing
    with pytest.raises(IllegalTransition, match="State.DONE -> State.RELAYING"):
        ex.state = RELAYING
    assert ex.state is DONE


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        pytest.param((), DECIDING, id="created-not-queued"),
        pytest.param((QUEUED,), RELAYING, id="relayed-before-deciding"),
        pytest.param((QUEUED, DECIDING, DRAINING), WAITING, id="upstream-after-answering"),
        pytest.param((QUEUED, DECIDING, AWAIT_UPSTREAM, WAITING, RELAYING), DRAINING, id="drain"),
    ],
)
def test_an_illegal_transition_is_refused(path: tuple[State, ...], illegal: State) -> None:
    ex = _exchange()
    for state in path:
        ex.state = state
    with pytest.raises(IllegalTransition):
        ex.state = illegal


def test_every_state_has_its_transitions() -> None:
    assert set(NEXT) == set(State)
