"""The lease election's vocabulary: the messages voters and candidates
exchange, and the actions the core (`hived.mesh.election`) returns to its
shell. DESIGN.md, "Lease election", says what each means on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from hived.mesh.sansio import Send
from hived.protocol.fields import Address, Name, RoundId, Seconds, Term
from hived.protocol.wire import Message, message

# --------------------------------------------------------------------------
# Actions and events


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send `msg` to every live member (Membership.live_addresses()), and to
    the addresses in `also` that are not among them."""

    msg: Message
    also: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Persist:
    """Write these two numbers to data_dir *before* carrying out the actions
    after it, and pass them back as `initial_term` / `initial_promised` after
    a restart. `promised` is the highest term this node granted or asked for."""

    term: int
    promised: int


@dataclass(frozen=True, slots=True)
class BecameCoordinator:
    """We hold the lease for `term` until local monotonic time `until`. Emitted
    again when a renewal extends it (`until` later) or moves it to a new term."""

    term: int
    until: float


@dataclass(frozen=True, slots=True)
class LostCoordinator:
    """We no longer hold the lease for `term`: stop acting as coordinator now."""

    term: int


Action = Send | Broadcast | Persist | BecameCoordinator | LostCoordinator

# --------------------------------------------------------------------------
# Messages


@message(b"E.ASK")
class Ask(Message):
    term: Term
    round: RoundId  # ties the answers to one round of asks (and its send time)
    name: Name


@message(b"E.GRANT")
class Grant(Message):
    term: Term
    round: RoundId


@message(b"E.DENY")
class Deny(Message):
    term: Term
    round: RoundId
    seen: Term  # the highest term this voter promised or knows was held
    wait: Seconds  # before it could grant anyone else, on the voter's clock


@message(b"E.RELEASE")
class Release(Message):
    """A candidacy round failed: the grant given for it protects nothing."""

    term: Term
    round: RoundId


@message(b"E.RESIGN")
class Resign(Message):
    """The sender stopped acting as coordinator of `term` and never will again
    (it is stopping): a grant for it in that term protects nothing."""

    term: Term


@message(b"E.LEADER")
class Leader(Message):
    term: Term
    name: Name
    address: Address  # the sender's own: a node announces only itself
    remaining: Seconds  # of lease left when sent, on the sender's clock


MESSAGES = (Ask, Grant, Deny, Release, Resign, Leader)
