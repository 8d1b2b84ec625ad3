"""What the sans-IO cores share: the actions they return, their story, and
how a transition table drives their moves.

The cores (membership, election) never touch a socket: they return actions
that the mesh shell carries out. Each core also keeps a `Story`, a bounded
ring of its recent state changes with increasing ids, printed when an
invariant fails (and by the tests) so a failure explains itself.

Each state machine (the election's role, a peer record, a pool's worker)
keeps its legal moves in one table, `(state, event) -> next state`, and
moves only by looking an event up in it (`transition`), as h11 does: the
table cannot drift from the code, and an event its state does not allow
is an `InternalError` naming both.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from hived.errors import InternalError
from hived.protocol.wire import Message


@dataclass(frozen=True, slots=True)
class Send:
    """Send `msg` to the node whose mesh inbox is at address `to`."""

    to: str
    msg: Message


@dataclass(frozen=True, slots=True)
class Connect:
    """Make sure a DEALER to `address` exists. Idempotent: a repeat is a retry,
    and the shell may keep the socket (ZeroMQ reconnects) or recreate it."""

    address: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the DEALER to `address`; nothing more will be sent there."""

    address: str


# --------------------------------------------------------------------------
# Story: a bounded ring of what happened, printed when an invariant fails.


@dataclass(frozen=True, slots=True)
class StoryEvent:
    id: int
    at: float
    what: str
    detail: str


class Story:
    """The last `size` state changes of one core, each with an increasing id."""

    def __init__(self, owner: str, size: int = 256) -> None:
        self.owner = owner
        self._ring: deque[StoryEvent] = deque(maxlen=size)
        self._next_id = 1

    def add(self, at: float, what: str, detail: str = "") -> int:
        event_id = self._next_id
        self._next_id += 1
        self._ring.append(StoryEvent(event_id, at, what, detail))
        return event_id

    def events(self) -> list[StoryEvent]:
        return list(self._ring)

    def format(self, last: int | None = None) -> str:
        events = self.events()[-last:] if last else self.events()
        lines = [f"story of {self.owner} ({len(events)} events):"]
        lines += [f"  #{e.id} t={e.at:.4f} {e.what} {e.detail}".rstrip() for e in events]
        return "\n".join(lines)


# --------------------------------------------------------------------------
# Transition tables


class StrEnum(str, enum.Enum):
    """A state or event name that compares, formats, logs and serializes as
    its string, as `enum.StrEnum` does from 3.11 on (3.10 is declared too)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


def transition(table: Mapping[tuple[S, E], S], machine: str, state: S, event: E) -> S:
    """The state `event` moves `machine` to from `state`, by `table`.

    `machine` says whose move it is ("election of a, term 3"); an event the
    table does not allow in `state` is a bug of ours: InternalError."""
    new = table.get((state, event))
    if new is None:
        raise InternalError(
            f"illegal move of {machine}: event {event.value} in state {state.value}"
        )
    return new
