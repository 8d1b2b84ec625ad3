"""The peer table: every node this one knows of, and the legal moves of each record.

Membership (`hived.mesh.membership`) decides when a peer's record moves; this
module keeps the records and moves them only by looking the event up in one
table, `TRANSITIONS` (an event a record's status does not allow is an
`InternalError` naming both).

A record is *pending* while the node is only hearsay (gossip named it, or it
sent a BEAT before we met), and *confirmed* (alive, suspect or dead) once it
introduced itself in a HELLO. The table indexes records by name, confirmed
ones also by address, counts the live (alive or suspect) ones, and keeps a
tombstone for each node that left, so stale gossip cannot bring it back.

Timers live in a lazy timer wheel: each record is armed at its next
threshold, rounded up to the wheel's grain (a quarter heartbeat), so arming
costs O(1), the next deadline is O(1), and one tick serves every record due
in the same grain even with thousands of peers; thresholds are met at most a
grain late. A record re-armed earlier leaves a stale entry behind, skipped
when its slot comes up.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

from hived.mesh.sansio import Story, StrEnum, transition


class PeerStatus(StrEnum):
    """What we observe of a peer; the same string in status, logs and the story."""

    PENDING = "pending"
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    GONE = "gone"


class PeerEvent(StrEnum):
    HEARD = "heard"  # it answered in person (HELLO), or was heard from again
    QUIET = "quiet"  # quiet for suspect_after
    SILENT = "silent"  # quiet for dead_after (from alive: the tick came late)
    DROPPED = "dropped"  # never answered, superseded, left, restarted, replaced or forgotten


PENDING, ALIVE, SUSPECT, DEAD, GONE = PeerStatus  # the names membership reads
LIVE = (ALIVE, SUSPECT)

# (status, event) -> the status it moves to. Nothing else sets `Peer.status`.
TRANSITIONS: dict[tuple[PeerStatus, PeerEvent], PeerStatus] = {
    (PENDING, PeerEvent.HEARD): ALIVE,
    (PENDING, PeerEvent.DROPPED): GONE,
    (ALIVE, PeerEvent.QUIET): SUSPECT,
    (ALIVE, PeerEvent.SILENT): DEAD,
    (ALIVE, PeerEvent.DROPPED): GONE,
    (SUSPECT, PeerEvent.HEARD): ALIVE,
    (SUSPECT, PeerEvent.SILENT): DEAD,
    (SUSPECT, PeerEvent.DROPPED): GONE,
    (DEAD, PeerEvent.HEARD): ALIVE,
    (DEAD, PeerEvent.DROPPED): GONE,
}


def next_status(p: Peer, event: PeerEvent) -> PeerStatus:
    """Where `event` moves `p`, by the table; InternalError if it may not."""
    return transition(TRANSITIONS, f"peer {p.name!r} (incarnation {p.incarnation})", p.status, event)


class Peer:
    """One node as this node sees it: what it said last, and what we observe."""

    __slots__ = ("name", "address", "incarnation", "version", "cpus", "gpus", "slots_free",
                 "load", "state", "term", "tasks_done", "status", "last_heard", "since", "mentioned",
                 "next_probe", "probe_every", "asked", "timer")  # fmt: skip

    def __init__(self, name: str, address: str, incarnation: int, now: float) -> None:
        self.name = name
        self.address = address
        self.incarnation = incarnation
        self.version = ""
        self.cpus = self.gpus = self.slots_free = self.term = self.tasks_done = 0
        self.load = 0.0
        self.state = "alive"  # what the peer says: alive | draining
        self.status: PeerStatus = PENDING  # what we observe
        self.last_heard: float | None = None
        self.since = now  # when `status` was entered
        self.mentioned = now  # pending: last time gossip named it
        self.next_probe = now
        self.probe_every = 0.0
        self.asked: float | None = None  # confirmed: when we last asked it for a HELLO
        self.timer: float = math.inf  # the timer-wheel slot it is armed in

    def view_state(self) -> str:
        """What the member list shows: the peer's own state while it is alive."""
        if self.status == ALIVE:
            return self.state
        return self.status


# Invariants (checked by `PeerTable.problems`, reported by `Membership.validate`):
#   * a name has at most one record, and an address maps to at most one
#     confirmed (alive/suspect/dead) name; this node is never its own peer;
#   * a confirmed record was heard from directly in its incarnation, so
#     `members()` lists only nodes that answered us;
#   * a name's incarnation never goes down while its record lives (a higher
#     one replaces the record, a lower one is ignored);
#   * every record is armed in the timer wheel at or before its next
#     threshold (rounded up to the wheel's grain), so no transition is missed;
#   * `live_count` equals the number of alive and suspect records.


class PeerTable:
    """The records of one node's peers, their tombstones and their timers."""

    def __init__(self, grain: float, story: Story) -> None:
        self.by_name: dict[str, Peer] = {}
        self.by_address: dict[str, str] = {}  # confirmed records only
        self.live_count = 0
        self._story = story
        self._tombs: dict[str, tuple[int, float]] = {}  # name -> (incarnation, until)
        self._grain = grain
        self._wheel: dict[int, list[Peer]] = {}
        self._slots: list[int] = []  # heap of the wheel's slot numbers

    # -- records -----------------------------------------------------------

    @property
    def pending_count(self) -> int:
        """How many records are hearsay (every other record is in `by_address`)."""
        return len(self.by_name) - len(self.by_address)

    def add_pending(self, p: Peer) -> None:
        """Record hearsay of a node; it stays pending until it says HELLO."""
        self.by_name[p.name] = p

    def add_member(self, p: Peer, now: float) -> None:
        """Record a node that introduced itself: confirmed, and alive from `now`."""
        self.by_name[p.name] = p
        self.by_address[p.address] = p.name
        p.status, p.last_heard, p.since = next_status(p, PeerEvent.HEARD), now, now
        self.live_count += 1

    def move(self, p: Peer, event: PeerEvent, now: float) -> None:
        """Move `p` by `event` (see TRANSITIONS)."""
        new = next_status(p, event)
        self.live_count += (new in LIVE) - (p.status in LIVE)
        self._story.add(now, f"{p.status}->{new}", f"{p.name} inc {p.incarnation}")
        p.status = new
        p.since = now

    def drop(self, p: Peer, now: float) -> None:
        """Move `p` to gone and forget its record and its timer."""
        confirmed = p.status != PENDING
        self.move(p, PeerEvent.DROPPED, now)
        del self.by_name[p.name]
        p.timer = math.inf
        if confirmed and self.by_address.get(p.address) == p.name:
            del self.by_address[p.address]

    # -- tombstones --------------------------------------------------------

    def bury(self, name: str, incarnation: int, until: float) -> None:
        """Remember until `until` that `name` left at `incarnation`: hearsay of
        it at that incarnation or older is stale (membership decides)."""
        self._tombs[name] = (incarnation, until)

    def buried(self, name: str, now: float) -> int | None:
        """The incarnation of `name` that left, while its tombstone stands."""
        tomb = self._tombs.get(name)
        if tomb is None:
            return None
        if tomb[1] <= now:
            del self._tombs[name]
            return None
        return tomb[0]

    def expire_tombs(self, now: float) -> None:
        if self._tombs:
            for name in [n for n, (_, until) in self._tombs.items() if until <= now]:
                del self._tombs[name]

    # -- timers ------------------------------------------------------------

    def arm(self, p: Peer, when: float) -> None:
        """Make sure `p` comes up in `due` no earlier than `when`, nor a grain later."""
        slot = math.ceil(when / self._grain)
        if slot * self._grain < when:
            slot += 1  # never fire before `when`, whatever the rounding
        if slot < p.timer:
            p.timer = slot
            bucket = self._wheel.get(slot)
            if bucket is None:
                self._wheel[slot] = bucket = []
                heapq.heappush(self._slots, slot)
            bucket.append(p)

    def next_timer(self) -> float | None:
        """When the earliest armed record is due (None if none is armed)."""
        return self._slots[0] * self._grain if self._slots else None

    def due(self, now: float) -> Iterator[Peer]:
        """Disarm and yield each record whose slot was due at `now` on entry.

        A record the caller re-arms at or before `now` waits for the next
        call, so one tick always ends: a re-arm that is not in the future is
        a bug, and it shows as a tick asked for at once, never as a loop that
        holds the event loop (and the GIL) for good.
        """
        slots, wheel, peers = self._slots, self._wheel, self.by_name
        ready = []
        while slots and slots[0] * self._grain <= now:
            ready.append(heapq.heappop(slots))
        for slot in ready:
            for p in wheel.pop(slot):
                if p.timer != slot or peers.get(p.name) is not p:
                    continue  # stale entry: re-armed earlier, or the record is gone
                p.timer = math.inf
                yield p

    # -- invariants --------------------------------------------------------

    def problems(self, own_name: str) -> list[str]:
        """The invariants above that do not hold, one line each."""
        problems = []
        if own_name in self.by_name:
            problems.append("this node is its own peer")
        for address, name in self.by_address.items():
            p = self.by_name.get(name)
            if p is None or p.address != address or p.status == PENDING:
                problems.append(f"address index {address} -> {name} is stale")
        live = 0
        for name, p in self.by_name.items():
            if p.name != name:
                problems.append(f"record {name} holds {p.name}")
            if p.status != PENDING and self.by_address.get(p.address) != name:
                problems.append(f"confirmed {name} missing from the address index")
            if p.status != PENDING and p.last_heard is None:
                problems.append(f"confirmed {name} never heard")
            if p.timer == math.inf:
                problems.append(f"{name} ({p.status}) has no timer")
            live += p.status in LIVE
        if live != self.live_count:
            problems.append(f"live_count {self.live_count} != {live}")
        return problems
