"""The transition tables of the election's role and of a peer record: the
legal moves as before, and every other (state, event) refused with an
InternalError naming both."""

from __future__ import annotations

import itertools
import json
import logging
import random

import msgpack
import pytest

from hived.errors import InternalError
from hived.mesh import election as el
from hived.mesh import peers
from hived.mesh.roles import TRANSITIONS as ROLE_TRANSITIONS
from hived.mesh.roles import RoleEvent
from hived.mesh.sansio import Story

A, B, C = "tcp://a:7700", "tcp://b:7700", "tcp://c:7700"

ROLE_MOVES = {
    (el.FOLLOWER, RoleEvent.STAND): el.CANDIDATE,
    (el.CANDIDATE, RoleEvent.WON): el.COORDINATOR,
    (el.CANDIDATE, RoleEvent.LOST): el.FOLLOWER,
    (el.COORDINATOR, RoleEvent.WON): el.COORDINATOR,
    (el.COORDINATOR, RoleEvent.STEP_DOWN): el.FOLLOWER,
}
PEER_MOVES = {
    (peers.PENDING, peers.PeerEvent.HEARD): peers.ALIVE,
    (peers.SUSPECT, peers.PeerEvent.HEARD): peers.ALIVE,
    (peers.DEAD, peers.PeerEvent.HEARD): peers.ALIVE,
    (peers.ALIVE, peers.PeerEvent.QUIET): peers.SUSPECT,
    (peers.ALIVE, peers.PeerEvent.SILENT): peers.DEAD,
    (peers.SUSPECT, peers.PeerEvent.SILENT): peers.DEAD,
    **{(s, peers.PeerEvent.DROPPED): peers.GONE
       for s in (peers.PENDING, peers.ALIVE, peers.SUSPECT, peers.DEAD)},
}  # fmt: skip


def election(role: el.Role) -> el.Election:
    e = el.Election("a", A, [A, B, C], 0.0, random.Random(7))
    e._role = role  # put it in the state under test
    return e


def test_the_role_table_is_the_legal_moves() -> None:
    assert ROLE_TRANSITIONS == ROLE_MOVES


@pytest.mark.parametrize(("role", "event"), sorted(ROLE_MOVES))
def test_a_legal_role_move_goes_where_the_table_says(role, event) -> None:
    e = election(role)
    e._move(event, 0.0)
    assert e.state is ROLE_MOVES[role, event]


@pytest.mark.parametrize(
    ("role", "event"), sorted(set(itertools.product(el.Role, RoleEvent)) - set(ROLE_MOVES))
)
def test_every_illegal_role_move_is_refused(role, event) -> None:
    e = election(role)
    with pytest.raises(
        InternalError, match=f"election of a, term 0: event {event} in state {role}"
    ):
        e._move(event, 0.0)
    assert e.state is role


def test_the_peer_table_is_the_legal_moves() -> None:
    assert peers.TRANSITIONS == PEER_MOVES


def record(status: peers.PeerStatus) -> tuple[peers.PeerTable, peers.Peer]:
    table = peers.PeerTable(0.125, Story("test"))
    p = peers.Peer("b", B, 5, 0.0)
    table.add_pending(p)
    p.status = status
    table.live_count = int(status in peers.LIVE)
    return table, p


@pytest.mark.parametrize(("status", "event"), sorted(PEER_MOVES))
def test_a_legal_peer_move_goes_where_the_table_says(status, event) -> None:
    table, p = record(status)
    table.move(p, event, 1.0)
    new = PEER_MOVES[status, event]
    assert p.status is new and p.since == 1.0
    assert table.live_count == int(new in peers.LIVE)


@pytest.mark.parametrize(
    ("status", "event"),
    sorted(set(itertools.product(peers.PeerStatus, peers.PeerEvent)) - set(PEER_MOVES)),
)
def test_every_illegal_peer_move_is_refused(status, event) -> None:
    table, p = record(status)
    with pytest.raises(
        InternalError, match=rf"peer 'b' \(incarnation 5\): event {event} in state {status}"
    ):
        table.move(p, event, 1.0)
    assert p.status is status


@pytest.mark.parametrize("state", [*el.Role, *peers.PeerStatus])
def test_states_read_and_serialize_as_their_strings(state) -> None:
    text = state.value
    assert state == text and f"{state}" == text and str(state) == text
    log_line = logging.makeLogRecord({"msg": "state %s", "args": (state,)}).getMessage()
    assert log_line == f"state {text}"
    assert json.dumps({"state": state}) == json.dumps({"state": text})
    assert msgpack.packb(state) == msgpack.packb(text)
