"""Who pulls from whom: the coordinator's matchmaker and a worker node's puller — sans-IO.

Theory of operation
-------------------
Task data never passes through the coordinator. Owners tell it how much
work they have queued (OFFER, while they have any); nodes with free slots
ask it for work (WANT); it answers with owners to pull from (POINT),
rotating through the owners with work that fits, so concurrent jobs on
different owners share the free slots about evenly. The node then pulls
ranges straight from those owners (PULL → RANGE), sized to its free slots.

    owner ──OFFER──▶ coordinator ◀──WANT── worker node
                         │                     ▲
                         └───────POINT─────────┘
    owner ◀──────────────PULL────────────────── worker node
    owner ───────────────RANGE / NONE──────────▶ worker node
    owner ◀──────────────DONE / LOST / OUT ──── worker node
    owner ───────────────DROP (job ended) ─────▶ worker node
    owner ───────────────HELD? (each dead_after) ─▶ worker node
    owner ◀──────────────HELD (what it lacks) ──── worker node

`Matchmaker` is the coordinator's side; `Puller` a worker node's. Both are
fed messages and a clock and return what to send; they never read a clock
or touch a socket. Offers expire, so a dead owner stops being pointed at
within `expire` seconds; a node that hears nothing back asks again after
`retry`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any

from hived.protocol.fields import Address, Count, CrashedAt, Seconds, Term, at_most
from hived.protocol.wire import Message, Rule, message

FunctionHash = Annotated[bytes, Rule("a function hash of at most 64 bytes", lambda v: len(v) <= 64)]


def _range_problem(start: int, stop: int) -> str | None:
    return None if start <= stop else f"range {start}-{stop} ends before it starts"



@message(b"S.OFFER")
class Offer(Message):
    cpu_items: Count  # items queued that need CPU slots only
    gpu_items: Count  # items queued that need a GPU slot


@message(b"S.WANT")
class Want(Message):
    cpus: Count  # free CPU slots
    gpus: Count  # free GPU slots


@message(b"S.POINT")
class Point(Message):
    term: Term  # the coordinator's term: stale coordinators are fenced off
    # owner addresses to pull from, best first
    owners: Annotated[list[Address], at_most(16, "tcp://host:port addresses")]


@message(b"S.PULL")
class Pull(Message):
    cpus: Count
    gpus: Count
    # function hashes this node already holds
    known: Annotated[list[FunctionHash], at_most(64, "function hashes")]


@message(b"S.RANGE")
class RangeMsg(Message):
    """A range to run: payload is [function blob if `has_blob`] + the chunk's frames."""

    assignment: Count
    job: int  # the owner's short id for the job (tags printed output)
    fn: FunctionHash
    has_blob: bool
    start: Count
    stop: Count
    cpus: Count
    gpus: Count
    precise: bool

    def problem(self) -> str | None:
        return _range_problem(self.start, self.stop)


@message(b"S.NONE")
class Nothing(Message):
    """The owner has nothing that fits: ask the coordinator again later."""


@message(b"S.DONE")
class RangeDone(Message):
    assignment: Count
    start: Count
    stop: Count
    elapsed: Seconds
    failures: Count

    def problem(self) -> str | None:
        return _range_problem(self.start, self.stop)


@message(b"S.FAIL")
class RangeFailed(Message):
    assignment: Count
    text: str


@message(b"S.LOST")
class RangeLost(Message):
    assignment: Count
    crashed_at: CrashedAt
    text: str


@message(b"S.OUT")
class RangeOutput(Message):
    """What a task emitted, to its job's owner: the fields of control's Output."""

    job: int
    stream: int
    text: str
    source: str
    logger: str = ""
    level: int = 0


@message(b"S.DROP")
class RangeDrop(Message):
    """The owner dropped these ranges (their job ended: cancelled, or its
    client vanished): the node stops running them."""

    assignments: list[Count]


@message(b"S.JOBSQ")
class JobsAsk(Message):
    """`hivectl jobs` asked a node: every node answers with its own jobs."""

    request: int


@message(b"S.JOBSA")
class JobsTell(Message):
    request: int
    jobs: list[dict[str, Any]]


@message(b"S.HELDQ")
class HeldAsk(Message):
    """The owner asks a node which of these ranges it still holds (each
    `dead_after`): a RANGE or a report dropped with a connection is found."""

    assignments: list[Count]


@message(b"S.HELDA")
class HeldTell(Message):
    missing: list[Count]  # asked of, not held here: never came, or its report was lost


UNANSWERED = 10  # retries after which an unanswered PULL is given up
FAN_OUT = 2  # owners named per POINT, and pulled from per round

MESSAGES = (Offer, Want, Point, Pull, RangeMsg, Nothing, RangeDone, RangeFailed, RangeLost,
            RangeOutput, JobsAsk, JobsTell, RangeDrop, HeldAsk, HeldTell)


@dataclass
class _Offer:
    cpu_items: int
    gpu_items: int
    until: float


class Matchmaker:
    """The coordinator's part: owners with work, matched to nodes with slots."""

    def __init__(self, expire: float, fan_out: int = FAN_OUT) -> None:
        self.expire, self.fan_out = expire, fan_out
        self.offers: dict[str, _Offer] = {}
        self._turn: deque[str] = deque()
        self.waiting: dict[str, tuple[Want, float]] = {}  # nodes that asked and got nothing

    def offer(self, owner: str, msg: Offer, now: float) -> list[tuple[str, list[str]]]:
        """Record an owner's work; returns (node, owners) to point now: nodes
        that asked in vain a moment ago need not wait for their next WANT."""
        if msg.cpu_items <= 0 and msg.gpu_items <= 0:
            self.forget(owner)
            return []
        if owner not in self.offers:
            self._turn.append(owner)
        self.offers[owner] = _Offer(msg.cpu_items, msg.gpu_items, now + self.expire)
        points = []
        for node, (want, until) in list(self.waiting.items()):
            if until < now:
                del self.waiting[node]
            elif node != owner:
                owners = [o for o in self.want(node, want, now) if o != node]
                if owners:
                    points.append((node, owners))
        return points

    def forget(self, owner: str) -> None:
        if self.offers.pop(owner, None) is not None:
            self._turn.remove(owner)

    def want(self, node: str, msg: Want, now: float) -> list[str]:
        """Owners the asking node should pull from, in turn so that each owner
        with work gets its share of the free slots."""
        for owner in [o for o, off in self.offers.items() if off.until < now]:
            self.forget(owner)
        chosen: list[str] = []
        for _ in range(len(self._turn)):
            owner = self._turn[0]
            self._turn.rotate(-1)
            off = self.offers[owner]
            if owner != node and (
                (msg.cpus > 0 and off.cpu_items > 0) or (msg.gpus > 0 and off.gpu_items > 0)
            ):
                chosen.append(owner)
                if len(chosen) == self.fan_out:
                    break
        if chosen:
            self.waiting.pop(node, None)
        else:
            self.waiting[node] = (msg, now + self.expire)
        return chosen


class Puller:
    """A worker node's part: whom to pull from when slots are free.

    It pulls straight from owners that gave it work or that the coordinator
    named (so running jobs flow on while a coordinator fails over), at most
    `fan_out` of them per round, taking them in turn so that concurrent
    owners share this node's slots. It also asks the coordinator (WANT) at
    most once per `retry` seconds while slots are free, busy or not: that is
    how an owner whose work arrived later gets a share of a node already
    pulling from another. An idle hive costs a message per node per `retry`.
    One PULL at a time per owner.
    """

    def __init__(self, retry: float, fan_out: int = FAN_OUT) -> None:
        self.retry, self.fan_out = retry, fan_out
        self.pulling: dict[str, float] = {}  # owners asked, not yet answered: when
        self.recent: list[str] = []  # owners to pull from, next turn first
        self._want_after = -math.inf

    def idle(self, now: float) -> tuple[list[str], bool]:
        """Slots are free: the owners to PULL from now, and whether to WANT."""
        for owner, asked in list(self.pulling.items()):
            if now - asked > UNANSWERED * self.retry:  # the PULL or its answer was lost
                del self.pulling[owner]
        direct = [o for o in self.recent if o not in self.pulling][: self.fan_out]
        for owner in direct:  # their turn is taken: to the back
            self.recent.remove(owner)
            self.recent.append(owner)
        self.pulling.update(dict.fromkeys(direct, now))
        if now < self._want_after:
            return direct, False
        self._want_after = now + self.retry
        return direct, True

    def pointed(self, owners: list[str], now: float, free: bool) -> list[str]:
        """The coordinator named owners: those to PULL from now (none if no
        slot is free any more: they are pulled from when one is)."""
        self.recent.extend(o for o in owners if o not in self.recent)
        if not free:
            return []
        fresh = [o for o in owners if o not in self.pulling]
        self.pulling.update(dict.fromkeys(fresh, now))
        return fresh

    def answered(self, owner: str, got_work: bool) -> None:
        self.pulling.pop(owner, None)
        if got_work and owner not in self.recent:
            self.recent.append(owner)
        elif not got_work:
            if owner in self.recent:
                self.recent.remove(owner)
            self._want_after = -math.inf  # an owner ran dry: ask where else work waits

    def gone(self, owner: str) -> None:
        self.pulling.pop(owner, None)
        if owner in self.recent:
            self.recent.remove(owner)
