"""What nodes tell each other for membership: HELLO, BEAT, LEAVE, and their gossip.

A node describes itself (`NodeInfo`) in a HELLO when it introduces itself and,
more briefly, in a BEAT every heartbeat; LEAVE says goodbye. HELLO and BEAT
each carry a *gossip sample*: up to `gossip_size` live members (name,
address, incarnation), which is how a node hears of members it has not met.
A sample travels as three parallel lists (names, addresses, incarnations):
compact, and each list is type-checked by the wire layer.

The samples rotate: the BEATs of one period are `BEAT_VARIANTS` distinct
messages, each with its own slice of the live list from a random offset,
dealt out in turn, so every member is mentioned somewhere while a BEAT stays
O(1) in size. The variants are identical objects for the shell to encode
once each.

Every field is declared with what it may hold (`hived.protocol.fields`), and the
three lists of a sample must be as long as each other, so the wire layer
refuses what no honest peer sends (an empty name, a negative count, a term
or incarnation near the end of its range, an address ZeroMQ cannot dial)
before membership sees it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Annotated

from hived.mesh.peers import LIVE, Peer
from hived.protocol.fields import Address, Count, Incarnation, Load, Name, Term, at_most
from hived.protocol.wire import Message, Rule, message

# A gossip sample longer than this is hostile (ours carry `gossip_size`).
MAX_GOSSIP = 64
# Distinct BEAT objects per heartbeat period (each with its own gossip slice).
BEAT_VARIANTS = 8
NODE_STATES = ("alive", "draining")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What this node says about itself (the shell owns it; see `Membership.update`)."""

    name: str
    address: str
    version: str
    cpus: int
    gpus: int
    slots_free: int
    load: float = 0.0
    state: str = "alive"  # alive | draining
    incarnation: int = 0
    tasks_done: int = 0


# A gossip sample: up to MAX_GOSSIP members, as three parallel lists.
SampleNames = Annotated[list[Name], at_most(MAX_GOSSIP, "node names")]
SampleAddresses = Annotated[list[Address], at_most(MAX_GOSSIP, "tcp://host:port addresses")]
SampleIncarnations = Annotated[list[Incarnation], at_most(MAX_GOSSIP, "incarnations")]
State = Annotated[str, Rule("alive or draining", lambda v: v in NODE_STATES)]
Version = Annotated[str, Rule("a version of at most 64 characters", lambda v: len(v) <= 64)]


def _sample_problem(m: PeerHello | Beat) -> str | None:
    n = len(m.names)
    if n != len(m.addresses) or n != len(m.incarnations):
        return (f"gossip is malformed: {n} names, {len(m.addresses)} addresses, "
                f"{len(m.incarnations)} incarnations (expected as many of each)")  # fmt: skip
    return None


@message(b"M.HELLO")
class PeerHello(Message):
    name: Name
    address: Address  # must be the connection's own: a node speaks only for itself
    version: Version
    incarnation: Incarnation
    cpus: Count
    gpus: Count
    slots_free: Count
    load: Load
    state: State
    term: Term
    tasks_done: Count
    reply: bool  # the receiver should answer with a HELLO of its own
    names: SampleNames
    addresses: SampleAddresses
    incarnations: SampleIncarnations

    def problem(self) -> str | None:
        return _sample_problem(self)


@message(b"M.BEAT")
class Beat(Message):
    name: Name
    incarnation: Incarnation
    slots_free: Count
    load: Load
    state: State
    term: Term
    tasks_done: Count
    names: SampleNames
    addresses: SampleAddresses
    incarnations: SampleIncarnations

    def problem(self) -> str | None:
        return _sample_problem(self)


@message(b"M.LEAVE")
class Leave(Message):
    name: Name
    incarnation: Incarnation


MESSAGES = (PeerHello, Beat, Leave)


def new_beats(
    me: NodeInfo, term: int, live: Sequence[Peer], rng: random.Random, gossip_size: int
) -> list[Beat]:
    """The BEAT variants of one heartbeat period (none when `live` is empty)."""
    n = len(live)
    if not n:
        return []
    start = rng.randrange(n)
    k = min(gossip_size, n)
    names = [p.name for p in live]
    addresses = [p.address for p in live]
    incs = [p.incarnation for p in live]
    # wrap around, so a slice starting near the end still holds k members
    names += names[:k]
    addresses += addresses[:k]
    incs += incs[:k]
    variants = []
    for i in range(min(n, BEAT_VARIANTS)):
        s = (start + i * k) % n
        variants.append(
            Beat(me.name, me.incarnation, me.slots_free, me.load, me.state, term,
                 me.tasks_done, names[s : s + k], addresses[s : s + k], incs[s : s + k])
        )  # fmt: skip
    return variants


def new_hello(
    me: NodeInfo,
    term: int,
    reply: bool,
    live: Sequence[Peer],
    rng: random.Random,
    gossip_size: int,
) -> PeerHello:
    """A HELLO whose sample starts at a random offset of `live`.

    `live` may be up to a timer grain old, so members no longer live are
    skipped; looking at most twice the sample size keeps this O(1).
    """
    chosen: list[Peer] = []
    if live:
        n, s = len(live), rng.randrange(len(live))
        for i in range(min(n, 2 * gossip_size)):
            p = live[(s + i) % n]
            if p.status in LIVE and len(chosen) < gossip_size:
                chosen.append(p)
    return PeerHello(me.name, me.address, me.version, me.incarnation, me.cpus, me.gpus,
                 me.slots_free, me.load, me.state, term, me.tasks_done, reply,
                 [p.name for p in chosen], [p.address for p in chosen],
                 [p.incarnation for p in chosen])  # fmt: skip


class Speaker:
    """What one node says about itself: its BEATs and HELLOs, each with a
    gossip sample of the live peers. The live list is rebuilt at most once a
    timer grain (and at each heartbeat), so a HELLO's sample does not cost
    O(N) when thousands arrive at once; a few HELLO variants are built per
    grain and dealt out in turn."""

    def __init__(self, grain: float, rng: random.Random, gossip_size: int) -> None:
        self.gossip_size = gossip_size
        self._grain, self._rng = grain, rng
        self._live: list[Peer] = []
        self._built = -math.inf
        self._hellos: dict[bool, list[PeerHello]] = {}
        self._turn = 0

    def changed(self) -> None:
        """What this node says about itself changed: build new HELLOs."""
        self._hellos.clear()

    def beats(
        self, me: NodeInfo, term: int, peers: Collection[Peer], now: float
    ) -> list[tuple[str, Beat]]:
        """(address, BEAT) for every live peer, the period's variants (see
        `new_beats`) dealt out in turn."""
        live = self._live_view(peers, now, fresh=True)
        variants = new_beats(me, term, live, self._rng, self.gossip_size)
        m = len(variants)
        return [(p.address, variants[i % m]) for i, p in enumerate(live)]

    def hello(
        self, me: NodeInfo, term: int, reply: bool, peers: Collection[Peer], now: float
    ) -> PeerHello:
        """Our HELLO (asking for one back if `reply`)."""
        live = self._live_view(peers, now)
        variants = self._hellos.get(reply)
        if variants is None:
            count = min(max(len(live), 1), BEAT_VARIANTS)
            variants = self._hellos[reply] = [
                new_hello(me, term, reply, live, self._rng, self.gossip_size)
                for _ in range(count)
            ]
        self._turn += 1
        return variants[self._turn % len(variants)]

    def _live_view(self, peers: Collection[Peer], now: float, fresh: bool = False) -> list[Peer]:
        if fresh or now - self._built >= self._grain:
            self._live = [p for p in peers if p.status in LIVE]
            self._built = now
            self._hellos.clear()
        return self._live
