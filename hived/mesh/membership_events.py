"""What membership (`hived.mesh.membership`) tells its shell: the member
list's rows, and the events of peers joining, changing state and leaving.
"""

from __future__ import annotations

from dataclasses import dataclass

from hived.mesh.sansio import Connect, Disconnect, Send


@dataclass(frozen=True, slots=True)
class MemberView:
    """One row of the member list; `state` is alive/suspect/dead/draining."""

    name: str
    address: str
    state: str
    cpus: int
    gpus: int
    slots_free: int
    load: float
    version: str
    incarnation: int
    last_heard: float | None  # None for this node itself
    term: int  # highest lease term the member reported
    tasks_done: int


@dataclass(frozen=True, slots=True)
class PeerJoined:
    member: MemberView


@dataclass(frozen=True, slots=True)
class PeerStateChanged:
    name: str
    address: str
    old: str  # view states: alive, suspect, dead, draining
    new: str


@dataclass(frozen=True, slots=True)
class PeerLeft:
    name: str
    address: str
    incarnation: int
    reason: str  # left | forgotten | restarted | replaced


@dataclass(frozen=True, slots=True)
class TermSeen:
    """The peer at `address` reported a lease term higher than it did before:
    feed it to `Election.heard_term` so fencing and `coordinator()` stay
    current (and, from a voter, so the election knows what it vouches for)."""

    address: str
    term: int


Action = Send | Connect | Disconnect | PeerJoined | PeerStateChanged | PeerLeft | TermSeen
