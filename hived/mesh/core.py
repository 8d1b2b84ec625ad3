"""The mesh core: membership and the lease election wired together — sans-IO.

Theory of operation
-------------------
A node runs two protocol cores, `Membership` (who is alive) and `Election`
(who holds the lease). They need each other: a term a peer reports in a
heartbeat raises the election's fencing floor, the election's term rides in
every heartbeat, a broadcast goes to the members alive right now. That
wiring is this class, and only this class: the daemon's shell
(`hived.mesh.shell`) and the simulator (`tests/simnet.py`) both drive a `MeshCore`
through a `MeshDriver`, so what the simulator measures is what the daemon
runs.

    driver ──handle(sender, msg, now)──▶ MeshCore ──▶ [Send, Connect, Disconnect,
           ──tick(now) / link_up(addr)─▶           Persist, PeerJoined,
           ──persist_failed(now)───────▶           PeerStateChanged, PeerLeft,
           ◀─next_deadline()────────────           BecameCoordinator, LostCoordinator]

The glue, once:

* Liveness: a membership message is membership's own business; any other
  mesh message (election or work) from a member counts as hearing from it.
* `TermSeen` (a peer's heartbeat named a higher term for itself) feeds
  `Election.heard_term`: a voter's is what it vouches for, and any peer's
  raises the fencing floor if credible. After every batch membership
  learns the election's term, so the next heartbeats carry it.
* `Broadcast` becomes one `Send` per live member (and per address in its
  `also` that is not one: a RESIGN reaches every voter).
* A member that joins, or comes back from suspect or dead, is told of our
  lease at once if we hold it: a restarted node, or the far side of a healed
  partition, learns the coordinator within one message instead of waiting
  for the next renewal.
* `link_up(address)`: the shell's connection to that address was (re)made;
  a peer we think dead is probed at once rather than at its next back-off,
  and is told of our lease (the LEADER sent when it came back may have
  met a link not yet up, and was dropped).

Persist before send (etcd raft's `Ready` rule): a batch's `Persist` must be
durable before anything after it is carried out. `MeshDriver.run` does
that: a Persist that cannot be written drops the rest of its batch and calls
`persist_failed`, after which the election grants and asks nothing until a
write succeeds (it retries every quarter lease).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from hived.mesh.election import (
    MESSAGES as ELECTION_MESSAGES,
)
from hived.mesh.election import Action as ElectionAction
from hived.mesh.election import (
    BecameCoordinator,
    Broadcast,
    Election,
    LostCoordinator,
    Persist,
)
from hived.mesh.gossip import MESSAGES as MEMBERSHIP_MESSAGES
from hived.mesh.gossip import NodeInfo
from hived.mesh.membership import Action as MembershipAction
from hived.mesh.membership import (
    Membership,
    PeerJoined,
    PeerLeft,
    PeerStateChanged,
    TermSeen,
)
from hived.mesh.sansio import Connect, Disconnect, Send
from hived.protocol.wire import Message

Event = PeerJoined | PeerStateChanged | PeerLeft | BecameCoordinator | LostCoordinator
Action = Send | Connect | Disconnect | Persist | Event


class MeshCore:
    """One node's membership and election, and the wiring between them."""

    def __init__(
        self,
        info: NodeInfo,
        seeds: list[str],
        now: float,
        rng: random.Random,
        *,
        heartbeat: float,
        dead_after: float,
        lease: float,
        voters: list[str] | None = None,
        initial_term: int = 0,
        initial_promised: int = 0,
        max_drift: float = 0.01,
        min_margin: float = 0.01,
        membership_options: dict[str, Any] | None = None,
    ) -> None:
        self.membership = Membership(
            info, seeds, heartbeat, dead_after, now, rng, **(membership_options or {})
        )
        self.election = Election(
            info.name, info.address, list(seeds if voters is None else voters), now, rng,
            lease=lease, max_drift=max_drift, min_margin=min_margin,
            initial_term=initial_term, initial_promised=initial_promised,
        )  # fmt: skip
        self.membership.set_term(self.election.term)

    # -- what the driver feeds ---------------------------------------------

    def handle(self, sender: str, msg: Message, now: float) -> list[Action]:
        """One decoded mesh message from the peer at `sender` (work messages
        included: they count as hearing from it, and the shell routes them on)."""
        if isinstance(msg, MEMBERSHIP_MESSAGES):
            return self._wire(self.membership.handle(sender, msg, now), now)
        actions: list[ElectionAction | MembershipAction] = []
        actions += self.membership.heard_from(sender, now)
        if isinstance(msg, ELECTION_MESSAGES):
            actions += self.election.handle(sender, msg, now)
        return self._wire(actions, now)

    def tick(self, now: float) -> list[Action]:
        actions: list[ElectionAction | MembershipAction] = []
        actions += self.membership.tick(now)
        actions += self.election.tick(now)
        return self._wire(actions, now)

    def link_up(self, address: str, now: float) -> list[Action]:
        """The shell's connection to `address` was made (again): what we sent
        before it was up was dropped, our LEADER with it."""
        actions: list[ElectionAction | MembershipAction] = []
        actions += self.membership.link_up(address, now)
        leader = self.election.announcement(now)
        if leader is not None:
            actions.append(Send(address, leader))
        return self._wire(actions, now)

    def leave(self, now: float) -> list[Action]:
        return self._wire(self.membership.leave(now), now)

    def step_down(self, now: float) -> list[Action]:
        """The node is stopping: hand the lease over (Election.step_down)."""
        return self._wire(self.election.step_down(now), now)

    def persist_failed(self, now: float) -> list[Action]:
        """The last Persist could not be written; the rest of its batch was dropped."""
        return self._wire(self.election.persist_failed(now), now)

    def accept_term(self, term: int) -> bool:
        """Fencing for other cores' coordinator messages (see Election.accept_term);
        a step-down it causes comes out of the next `tick`."""
        return self.election.accept_term(term)

    def next_deadline(self) -> float | None:
        """The local time at which `tick` has work next; -inf means at once."""
        due = [d for d in (self.membership.next_deadline(), self.election.next_deadline())
               if d is not None]  # fmt: skip
        return min(due) if due else None

    # -- what the driver reads ---------------------------------------------

    def coordinator(self, now: float) -> tuple[str, int] | None:
        return self.election.coordinator(now)

    def coordinator_address(self, now: float) -> str | None:
        return self.election.coordinator_address(now)

    def is_coordinator(self, now: float) -> bool:
        return self.election.is_coordinator(now)

    def validate(self) -> None:
        self.membership.validate()
        self.election.validate()

    # -- the wiring ----------------------------------------------------------

    def _wire(
        self, actions: Sequence[ElectionAction | MembershipAction], now: float
    ) -> list[Action]:
        out: list[Action] = []
        for a in actions:
            if isinstance(a, Broadcast):
                live = self.membership.live_addresses()
                out.extend(Send(address, a.msg) for address in live)
                out.extend(Send(address, a.msg) for address in a.also if address not in live)
                continue
            if isinstance(a, TermSeen):
                # a step-down this causes is due at once: next_deadline() says -inf
                self.election.heard_term(a.address, a.term)
                continue
            out.append(a)
            if isinstance(a, PeerJoined):
                back: str | None = a.member.address
            elif (isinstance(a, PeerStateChanged) and a.old in ("suspect", "dead")
                  and a.new not in ("suspect", "dead")):  # fmt: skip
                back = a.address
            else:
                back = None
            if back is not None:  # joined, or came back: tell it of our lease
                leader = self.election.announcement(now)
                if leader is not None:
                    out.append(Send(back, leader))
        self.membership.set_term(self.election.term)
        return out


class MeshDriver:
    """Carries out a MeshCore's actions, in order, Persist first.

    The daemon's shell (`hived.mesh.shell.Mesh`) and the simulator's nodes subclass
    it and supply the five primitives; the order and the persist rule live
    here, once.
    """

    core: MeshCore

    def run(self, actions: list[Action], now: float) -> None:
        for i, action in enumerate(actions):
            if isinstance(action, Send):
                self.send(action.to, action.msg)
            elif isinstance(action, Persist):
                try:
                    self.write_state(action.term, action.promised)
                except OSError as exc:
                    self.state_not_written(action, exc, len(actions) - i - 1)
                    self.run(self.core.persist_failed(now), now)
                    return
                self.state_written()
            elif isinstance(action, Connect):
                self.connect(action.address)
            elif isinstance(action, Disconnect):
                self.disconnect(action.address)
            else:
                self.event(action)

    # -- the primitives ----------------------------------------------------

    def send(self, address: str, msg: Message) -> None:
        raise NotImplementedError

    def connect(self, address: str) -> None:
        raise NotImplementedError

    def disconnect(self, address: str) -> None:
        raise NotImplementedError

    def write_state(self, term: int, promised: int) -> None:
        """Make (term, promised) durable; raise OSError if it cannot be."""
        raise NotImplementedError

    def state_not_written(self, action: Persist, exc: OSError, dropped: int) -> None:
        """A Persist failed; `dropped` actions after it were not carried out."""

    def state_written(self) -> None:
        """A Persist succeeded."""

    def event(self, event: Event) -> None:
        """A peer or lease event, for the log and the node."""
