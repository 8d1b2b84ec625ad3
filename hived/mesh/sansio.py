"""What the sans-IO cores share: the actions they return, and their story.

The cores (membership, election) never touch a socket: they return actions
that the mesh shell carries out. Each core also keeps a `Story`, a bounded
ring of its recent state changes with increasing ids, printed when an
invariant fails (and by the tests) so a failure explains itself.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
