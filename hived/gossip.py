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

The wire types let through values that no honest peer sends (an empty name,
a negative count, lists of unequal length); `check_peer_fields` and
`check_sample` turn those into a `RemoteProtocolError` naming the sender.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hived.errors import RemoteProtocolError
from hived.peers import LIVE, Peer
from hived.wire import Message, message

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


@message(b"M.HELLO")
class Hello(Message):
    name: str
    address: str
    version: str
    incarnation: int
    cpus: int
    gpus: int
    slots_free: int
    load: float
    state: str
    term: int
    tasks_done: int
    reply: bool  # the receiver should answer with a HELLO of its own
    names: list[str]
    addresses: list[str]
    incarnations: list[int]


@message(b"M.BEAT")
class Beat(Message):
    name: str
    incarnation: int
    slots_free: int
    load: float
    state: str
    term: int
    tasks_done: int
    names: list[str]
    addresses: list[str]
    incarnations: list[int]


@message(b"M.LEAVE")
class Leave(Message):
    name: str
    incarnation: int


MESSAGES = (Hello, Beat, Leave)


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
) -> Hello:
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
    return Hello(me.name, me.address, me.version, me.incarnation, me.cpus, me.gpus,
                 me.slots_free, me.load, me.state, term, me.tasks_done, reply,
                 [p.name for p in chosen], [p.address for p in chosen],
                 [p.incarnation for p in chosen])  # fmt: skip


def check_peer_fields(m: Hello | Beat, sender: str) -> None:
    """Reject values the wire types allow but no honest peer sends."""
    if not m.name:
        raise RemoteProtocolError(f"{type(m).__name__} from {sender} has an empty name")
    if m.state not in NODE_STATES:
        raise RemoteProtocolError(
            f"{type(m).__name__} from {sender} has state {m.state[:32]!r}, expected alive or draining"
        )
    if (m.incarnation < 0 or m.slots_free < 0 or m.term < 0 or m.tasks_done < 0
            or not math.isfinite(m.load)):
        raise RemoteProtocolError(
            f"{type(m).__name__} from {sender} has a negative count or a non-finite load"
        )
    if isinstance(m, Hello) and (m.cpus < 0 or m.gpus < 0):
        raise RemoteProtocolError(f"HELLO from {sender} has a negative cpu or gpu count")


def check_sample(m: Hello | Beat, sender: str) -> None:
    """Reject a gossip sample whose lists differ in length or are too long."""
    n = len(m.names)
    if n != len(m.addresses) or n != len(m.incarnations) or n > MAX_GOSSIP:
        raise RemoteProtocolError(
            f"gossip from {sender} is malformed: {n} names, {len(m.addresses)} addresses, "
            f"{len(m.incarnations)} incarnations (at most {MAX_GOSSIP}, all equal)"
        )
