"""Membership: who is in the mesh and whether they are alive — a sans-IO core.

Theory of operation
-------------------
A node is known by its unique *name* and dialled at its advertised *address*.
Each process start carries an *incarnation* number (the shell passes its start
time), so a restarted node supersedes its old self everywhere.

    shell ──handle(sender, msg, now)──▶ Membership ──▶ [Send, Connect, Disconnect,
          ──heard_from(sender, now)──▶             PeerJoined, PeerStateChanged,
          ──tick(now)────────────────▶             PeerLeft, TermSeen]
          ◀─next_deadline()──────────

* **Join.** At start the core sends HELLO (name, address, version, resources,
  incarnation) to every seed and asks for a HELLO back. A HELLO from a peer we
  did not know makes it a member at once and is answered when asked.
* **Heartbeats.** Every `heartbeat` seconds the node sends one BEAT to each
  live (alive or suspect) peer: its load, free slots, state, the highest lease
  term seen, and a *gossip sample* of `gossip_size` members (name, address,
  incarnation) taken at a random offset of the live list. A BEAT is O(1) in
  size, so a node sends (N-1) small messages per period: its heartbeat
  traffic grows linearly with the cluster, never quadratically.
* **Gossip.** A member we hear of and do not know is *pending*: we dial it and
  send HELLO (asking for one back), retrying with back-off while gossip keeps
  mentioning it. It becomes a member only when it answers itself, so every
  member is one we can reach directly. Only live members are gossiped.
* **Liveness.** Any message from a peer counts (the shell calls `heard_from`
  for messages of other cores; `handle` does it for ours). A peer is
  `suspect` after `suspect_after` (default 2 heartbeats) of quiet and `dead`
  after `dead_after`. Two periods, not 1.5: a single lost BEAT leaves a gap of
  just under two periods, so 1.5 would flag a suspect on every lost datagram;
  at two, a suspect means at least two beats in a row went missing, and
  `dead_after` remains the failure detector that re-queues work. Dead peers
  stay in the view (so `hivectl status` shows them) and are probed with a
  HELLO at growing intervals; after `forget_after` they are forgotten.
* **A peer speaks only for itself.** `sender` is the address of the
  connection a message came on (its DEALER's routing id, which only
  holders of the cluster key can present). A HELLO must give that address;
  a BEAT or LEAVE must name the member at that address. A name a live
  member holds is not taken from another address; once that member is
  dead, a HELLO from elsewhere may take it (a node restarted on a new
  address). Anything else is a `RemoteProtocolError`, and nothing changes.
* **Leave.** A LEAVE removes the peer at once; a tombstone keeps stale gossip
  about that incarnation from bringing it back until `forget_after` (a
  HELLO in person from another process under that name is welcome).
* **Restart.** A higher incarnation in a HELLO at the member's address
  proves the old process is gone: the old member is reported as left
  ("restarted") and the new one joins. A lower one is a late message of an
  old process while the member is live, and a new process (its clock set
  back) once it is dead, so no incarnation, however inflated, sticks. A
  BEAT of another incarnation, or gossip of a newer one at the member's
  address, only asks the member for a HELLO (at most once a heartbeat): its
  own answer decides, so one member's gossip cannot evict another. Nodes
  heard of and not yet met are at most `hearsay_limit`, as each is dialled.
* **Seeds** are retried with exponential back-off (capped at `probe_cap`)
  whenever no live member answers at that address (`hived.mesh.seedprobes`).

The peer records, their legal moves and their timers are the peer table
(`hived.mesh.peers`): each peer is armed in a lazy timer wheel at its next
threshold, rounded up to a quarter heartbeat, so a BEAT costs O(1),
`next_deadline()` is O(1), and one tick serves every peer due in the same
quarter heartbeat even with thousands of peers; thresholds are met at most
that late. The messages, and the gossip samples they carry, are
`hived.mesh.gossip`.
"""

from __future__ import annotations

import random
from dataclasses import replace

from hived.errors import InternalError, RemoteProtocolError
from hived.mesh.gossip import (
    MAX_GOSSIP,
    MESSAGES,
    NODE_STATES,
    Beat,
    Leave,
    NodeInfo,
    PeerHello,
    Speaker,
)
from hived.mesh.membership_events import (
    Action,
    MemberView,
    PeerJoined,
    PeerLeft,
    PeerStateChanged,
    TermSeen,
)
from hived.mesh.peers import ALIVE, DEAD, LIVE, PENDING, Peer, PeerEvent, PeerTable
from hived.mesh.sansio import Connect, Disconnect, Send, Story
from hived.mesh.seedprobes import SeedProbes
from hived.protocol.wire import Message

# Nodes heard of and not yet met, at most: each is dialled (two sockets in
# the daemon), so a flood of made-up names must not open thousands.
HEARSAY_LIMIT = 256

# What the shell, the mesh core and the tests take from here.
__all__ = [
    "HEARSAY_LIMIT", "Action", "Connect", "Disconnect", "MemberView", "Membership", "Message",
    "PeerJoined", "PeerLeft", "PeerStateChanged", "Send", "TermSeen",
]  # fmt: skip

# --------------------------------------------------------------------------
# The core


class Membership:
    """The member list of one node. See the module docstring."""

    def __init__(
        self,
        self_info: NodeInfo,
        seeds: list[str],
        heartbeat: float,
        dead_after: float,
        now: float,
        rng: random.Random,
        *,
        suspect_after: float | None = None,
        forget_after: float | None = None,
        gossip_size: int = 3,
        probe_cap: float | None = None,
        hearsay_limit: int = HEARSAY_LIMIT,
        story_size: int = 256,
    ) -> None:
        suspect_after = 2 * heartbeat if suspect_after is None else suspect_after
        if not 0 < heartbeat < suspect_after < dead_after:
            raise InternalError(
                "membership needs 0 < heartbeat < suspect_after < dead_after, got "
                f"{heartbeat}, {suspect_after}, {dead_after}"
            )
        if self_info.state not in NODE_STATES:
            raise InternalError(
                f"node state must be alive or draining, got {self_info.state!r}"
            )
        self._info = self_info
        self.heartbeat = heartbeat
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.forget_after = 20 * dead_after if forget_after is None else forget_after
        self.probe_cap = dead_after if probe_cap is None else probe_cap
        self.hearsay_limit = hearsay_limit
        self._rng = rng
        self.story = Story(f"membership of {self_info.name}", story_size)
        # Timer wheel: peers' thresholds are rounded up to a grain of a quarter
        # heartbeat, so one tick serves many peers (and a state change comes at
        # most a quarter heartbeat after its threshold).
        self._grain = heartbeat / 4
        self._peers = PeerTable(self._grain, self.story)
        self._term = 0
        self._stopped = False
        self._seeds = [s for s in dict.fromkeys(seeds) if s != self_info.address]
        self._seed_probes = SeedProbes(self._seeds, heartbeat, self.probe_cap, now, rng)
        # a random first phase, so nodes started together do not beat in step
        self._next_beat = now + heartbeat * rng.random()
        self._speaker = Speaker(self._grain, rng, max(0, min(gossip_size, MAX_GOSSIP)))
        self.story.add(now, "start", f"incarnation={self_info.incarnation} seeds={self._seeds}")

    # -- what the shell reads ----------------------------------------------

    @property
    def info(self) -> NodeInfo:
        return self._info

    @property
    def gossip_size(self) -> int:
        """How many members each BEAT and HELLO names."""
        return self._speaker.gossip_size

    @property
    def live_count(self) -> int:
        """How many peers are alive or suspect."""
        return self._peers.live_count

    def next_deadline(self) -> float | None:
        """The local time at which `tick` has work next (None once stopped)."""
        if self._stopped:
            return None
        due = min(self._next_beat, self._seed_probes.due)
        timer = self._peers.next_timer()
        return due if timer is None else min(due, timer)

    def members(self) -> list[MemberView]:
        """This node first, then every confirmed peer (alive, suspect or dead) by name."""
        me = self._info
        rows = [MemberView(me.name, me.address, me.state, me.cpus, me.gpus, me.slots_free,
                           me.load, me.version, me.incarnation, None, self._term,
                           me.tasks_done)]  # fmt: skip
        confirmed = (p for p in self._peers.by_name.values() if p.status != PENDING)
        return rows + [self._view(p) for p in sorted(confirmed, key=_by_name)]

    def member(self, name: str) -> MemberView | None:
        if name == self._info.name:
            return self.members()[0]
        p = self._peers.by_name.get(name)
        return self._view(p) if p is not None and p.status != PENDING else None

    def live_addresses(self) -> list[str]:
        """Addresses of alive and suspect peers: where a broadcast goes."""
        return [p.address for p in self._peers.by_name.values() if p.status in LIVE]

    def name_of(self, address: str) -> str | None:
        return self._peers.by_address.get(address)

    # -- what the shell tells us -------------------------------------------

    def update(
        self,
        *,
        load: float | None = None,
        slots_free: int | None = None,
        state: str | None = None,
        tasks_done: int | None = None,
    ) -> None:
        """Change what the next heartbeats say about this node."""
        if state is not None and state not in NODE_STATES:
            raise InternalError(f"node state must be alive or draining, got {state!r}")
        me = self._info
        self._info = replace(
            me,
            load=me.load if load is None else load,
            slots_free=me.slots_free if slots_free is None else slots_free,
            state=me.state if state is None else state,
            tasks_done=me.tasks_done if tasks_done is None else tasks_done,
        )
        self._speaker.changed()

    def set_term(self, term: int) -> None:
        """The highest lease term this node has seen (from the election core)."""
        if term > self._term:
            self._term = term
            self._speaker.changed()

    def leave(self, now: float) -> list[Action]:
        """Say goodbye to every peer; the core is stopped afterwards."""
        if self._stopped:
            return []
        msg = Leave(self._info.name, self._info.incarnation)
        out: list[Action] = [
            Send(p.address, msg) for p in self._peers.by_name.values() if p.status in LIVE
        ]
        self._stopped = True
        self.story.add(now, "leave", f"told {len(out)} peers")
        return out

    def heard_from(self, address: str, now: float) -> list[Action]:
        """Any message from `address` (of any core) proves that peer alive."""
        name = self._peers.by_address.get(address)
        if name is None or self._stopped:
            return []
        out: list[Action] = []
        self._heard(self._peers.by_name[name], now, out)
        return out

    def link_up(self, address: str, now: float) -> list[Action]:
        """The shell's connection to `address` was made (again). Unless a live
        member is there, whoever is (a peer we think dead, hearsay, a seed)
        is asked for a HELLO now: what we sent before the link was up was
        dropped, and the next probe may be a back-off away."""
        if self._stopped:
            return []
        if self._linked(address):
            return []
        return [Send(address, self._hello(True, now))]

    def handle(self, sender: str, msg: Message, now: float) -> list[Action]:
        """Feed one decoded membership message from the peer at `sender`."""
        if not isinstance(msg, MESSAGES):
            raise InternalError(
                f"membership got a {type(msg).__name__}, not one of its messages"
            )
        if self._stopped:
            return []
        out: list[Action] = []
        match msg:
            case PeerHello():
                self._on_hello(sender, msg, now, out)
            case Beat():
                self._on_beat(sender, msg, now, out)
            case Leave():
                self._on_leave(sender, msg, now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Send due heartbeats and probes, and move quiet peers along."""
        if self._stopped:
            return []
        out: list[Action] = []
        for p in self._peers.due(now):
            self._check(p, now, out)
        if now >= self._next_beat:
            self._beat(now, out)
            self._next_beat = max(self._next_beat + self.heartbeat, now + self.heartbeat / 2)
            self._peers.expire_tombs(now)
        if now >= self._seed_probes.due:
            self._probe_seeds(now, out)
        return out

    # -- invariants --------------------------------------------------------

    def validate(self) -> None:
        """Check the peer table's invariants; raise InternalError with the story."""
        problems = self._peers.problems(self._info.name)
        if problems:
            raise InternalError(
                f"membership of {self._info.name} broke invariants: {'; '.join(problems)}\n"
                + self.story.format(50)
            )

    # -- handlers ----------------------------------------------------------

    def _on_hello(self, sender: str, m: PeerHello, now: float, out: list[Action]) -> None:
        if m.address != sender:
            raise RemoteProtocolError(
                f"HELLO from {sender} gives the address {m.address}; "
                "a node speaks only for itself, at its own address"
            )
        me = self._info
        if m.name == me.name:
            if m.incarnation == me.incarnation and m.address == me.address:
                return  # we dialled ourselves
            raise RemoteProtocolError(
                f"peer at {m.address} claims our name {me.name!r}; names must be unique"
            )
        if self._peers.buried(m.name, now) == m.incarnation:
            return  # the very process that said LEAVE
        p = self._peers.by_name.get(m.name)
        # our own HELLO asking for one back went to it less than a heartbeat
        # ago: it carries what an answer would, so two messages join a pair
        crossed = (
            p is not None and p.status == PENDING and p.address == m.address
            and now - (p.next_probe - p.probe_every) < self.heartbeat
        )  # fmt: skip
        if p is not None and p.status != PENDING:
            if p.address != m.address:
                if p.status in LIVE:
                    raise RemoteProtocolError(
                        f"HELLO from {sender} claims the name {m.name!r}, which the live "
                        f"member at {p.address} holds; names must be unique"
                    )
                self._remove(p, "restarted", now, out)  # elsewhere: the old process is dead
                p = None
            elif p.incarnation != m.incarnation:
                if p.incarnation > m.incarnation and p.status in LIVE:
                    return  # an old process's late HELLO
                # a new process at that address (its clock may have been set back
                # once the old one went dead): an inflated record never sticks
                self._remove(p, "restarted", now, out)
                p = None
        if p is None or p.status == PENDING:
            p = self._confirm(m, p, now, out)  # hearsay yields to the node in person
        else:
            self._update(p, m, now, out)
        self._saw_term(m.term, p, out)
        self._gossip(m, sender, now, out)
        if m.reply and not crossed:
            out.append(Send(m.address, self._hello(False, now)))

    def _on_beat(self, sender: str, m: Beat, now: float, out: list[Action]) -> None:
        bound = self._peers.by_address.get(sender)
        if bound is None:
            p = self._peers.by_name.get(m.name)
            if p is not None and p.status in LIVE:
                raise RemoteProtocolError(
                    f"BEAT from {sender} names {m.name!r}, the member at {p.address}; "
                    "a node speaks only for itself"
                )
            # a node we have not met: ask it to introduce itself
            self._learn(m.name, sender, m.incarnation, now, out)
        elif bound != m.name:
            raise RemoteProtocolError(
                f"BEAT from {sender} names {m.name!r}, but {bound!r} is the member there; "
                "a node speaks only for itself"
            )
        else:
            p = self._peers.by_name[bound]
            if p.incarnation == m.incarnation:
                self._update(p, m, now, out)
                self._saw_term(m.term, p, out)
            elif m.incarnation > p.incarnation or p.status not in LIVE:
                self._ask(p, now, out)  # another process there: its HELLO decides
        self._gossip(m, sender, now, out)

    def _on_leave(self, sender: str, m: Leave, now: float, out: list[Action]) -> None:
        bound = self._peers.by_address.get(sender)
        if bound is None:
            return  # not a member: nothing to remove
        if bound != m.name:
            raise RemoteProtocolError(
                f"LEAVE from {sender} names {m.name!r}, but {bound!r} is the member there; "
                "a node speaks only for itself"
            )
        p = self._peers.by_name[bound]
        if p.incarnation != m.incarnation:
            return  # an older process's goodbye
        self._peers.bury(m.name, m.incarnation, now + self.forget_after)
        self._remove(p, "left", now, out)

    # -- internals ---------------------------------------------------------

    def _confirm(self, m: PeerHello, pending: Peer | None, now: float, out: list[Action]) -> Peer:
        """Make a member of a node that introduced itself."""
        if pending is not None:  # hearsay confirmed: the record is rebuilt from the HELLO
            self._peers.drop(pending, now)
        other = self._peers.by_address.get(m.address)
        if other is not None:
            # one address hosts one node: the old one there is gone
            self._remove(self._peers.by_name[other], "replaced", now, out)
        p = Peer(m.name, m.address, m.incarnation, now)
        p.version, p.cpus, p.gpus = m.version, m.cpus, m.gpus
        p.slots_free, p.load, p.state = m.slots_free, m.load, m.state
        p.tasks_done = m.tasks_done
        self._peers.add_member(p, now)
        self._peers.arm(p, now + self.suspect_after)
        self.story.add(now, "joined", f"{m.name} at {m.address} inc {m.incarnation}")
        out.append(Connect(m.address))
        out.append(PeerJoined(self._view(p)))
        return p

    def _update(self, p: Peer, m: PeerHello | Beat, now: float, out: list[Action]) -> None:
        p.last_heard = now
        p.tasks_done = m.tasks_done
        if p.status == ALIVE and p.state == m.state:  # the common case: a routine BEAT
            p.slots_free, p.load = m.slots_free, m.load
            if isinstance(m, PeerHello):
                p.version, p.cpus, p.gpus = m.version, m.cpus, m.gpus
            return
        before = p.view_state()
        p.slots_free, p.load, p.state = m.slots_free, m.load, m.state
        if isinstance(m, PeerHello):
            p.version, p.cpus, p.gpus = m.version, m.cpus, m.gpus
        p.last_heard = now
        if p.status != ALIVE:
            self._peers.move(p, PeerEvent.HEARD, now)
            self._peers.arm(p, now + self.suspect_after)
        after = p.view_state()
        if after != before:
            out.append(PeerStateChanged(p.name, p.address, before, after))

    def _heard(self, p: Peer, now: float, out: list[Action]) -> None:
        if p.status == PENDING:
            p.mentioned = now
            return
        p.last_heard = now
        if p.status != ALIVE:
            before = p.view_state()
            self._peers.move(p, PeerEvent.HEARD, now)
            self._peers.arm(p, now + self.suspect_after)
            out.append(PeerStateChanged(p.name, p.address, before, p.view_state()))

    def _saw_term(self, term: int, p: Peer, out: list[Action]) -> None:
        if term > p.term:  # a term going backwards from one peer is ignored
            p.term = term
            out.append(TermSeen(p.address, term))

    def _gossip(self, m: PeerHello | Beat, sender: str, now: float, out: list[Action]) -> None:
        peers = self._peers.by_name
        names, addresses, incs = m.names, m.addresses, m.incarnations
        for i in range(len(names)):
            p = peers.get(names[i])
            if p is not None and p.incarnation >= incs[i]:
                if p.status == PENDING:
                    p.mentioned = now
                continue  # the common case: nothing new
            self._learn(names[i], addresses[i], incs[i], now, out)

    def _learn(self, name: str, address: str, inc: int, now: float, out: list[Action]) -> None:
        """Hearsay of a member: dial it and ask it to introduce itself.

        Hearsay never changes a member we confirmed: a newer incarnation of
        one, at its address, only makes us ask it for a HELLO, and its own
        answer decides (`_on_hello`). So one member's gossip cannot evict
        another."""
        if name == self._info.name:
            return
        buried = self._peers.buried(name, now)
        if buried is not None and inc <= buried:
            return
        p = self._peers.by_name.get(name)
        if p is not None and p.status != PENDING:
            if inc > p.incarnation and address == p.address:
                self._ask(p, now, out)
            return
        if p is not None:
            if p.incarnation > inc:
                return
            if p.address != address:
                self._forget_address(p.address, out)
            p.incarnation, p.address, p.mentioned = inc, address, now
            return
        if self._peers.pending_count >= self.hearsay_limit:
            return  # a flood of names: those gossip keeps naming come back later
        p = Peer(name, address, inc, now)
        self._peers.add_pending(p)
        self._probe(p, now, out)
        self.story.add(now, "heard of", f"{name} at {address} inc {inc}")

    def _ask(self, p: Peer, now: float, out: list[Action]) -> None:
        """Ask a member for its HELLO (another incarnation spoke or was named
        at its address), at most once a heartbeat."""
        if p.asked is None or now >= p.asked + self.heartbeat:
            p.asked = now
            out.append(Send(p.address, self._hello(True, now)))

    def _probe(self, p: Peer, now: float, out: list[Action]) -> None:
        out.append(Connect(p.address))
        out.append(Send(p.address, self._hello(True, now)))
        p.probe_every = min(max(p.probe_every * 2, self.heartbeat), self.probe_cap)
        p.next_probe = now + p.probe_every
        limit = (
            p.mentioned + self.dead_after if p.status == PENDING else p.since + self.forget_after
        )
        self._peers.arm(p, min(p.next_probe, limit))

    def _check(self, p: Peer, now: float, out: list[Action]) -> None:
        """The peer's timer fired: apply whatever threshold it crossed, re-arm.

        Every threshold is compared as a deadline (`now >= since + period`),
        the same sum that is armed, never as an age (`now - since >= period`):
        in floating point the two can disagree, and on a millisecond clock
        (uvloop's) they often do, so a peer re-armed at a deadline the age
        test said was still ahead would come due again at once, for ever.
        """
        st = p.status
        if st == PENDING:
            gone_at = p.mentioned + self.dead_after
            if now >= gone_at:
                self._remove(p, "unreachable", now, out)
            elif now >= p.next_probe:
                self._probe(p, now, out)
            else:
                self._peers.arm(p, min(p.next_probe, gone_at))
        elif st == DEAD:
            forget_at = p.since + self.forget_after
            if now >= forget_at:
                self._remove(p, "forgotten", now, out)
            elif now >= p.next_probe and p.address not in self._seed_probes:
                self._probe(p, now, out)  # seed addresses are probed by _probe_seeds
            else:
                if now >= p.next_probe:
                    p.next_probe = now + self.probe_cap
                self._peers.arm(p, min(p.next_probe, forget_at))
        else:
            last = p.last_heard if p.last_heard is not None else p.since
            dead_at, suspect_at = last + self.dead_after, last + self.suspect_after
            before = p.view_state()
            if now >= dead_at:
                self._peers.move(p, PeerEvent.SILENT, now)
                p.probe_every = 0.0
                p.next_probe = now + self.heartbeat
                self._peers.arm(p, p.next_probe)
            elif now >= suspect_at:
                if st == ALIVE:
                    self._peers.move(p, PeerEvent.QUIET, now)
                self._peers.arm(p, dead_at)
            else:
                self._peers.arm(p, suspect_at)
            if p.view_state() != before:
                out.append(PeerStateChanged(p.name, p.address, before, p.view_state()))

    def _remove(self, p: Peer, reason: str, now: float, out: list[Action]) -> None:
        confirmed = p.status != PENDING
        self._peers.drop(p, now)
        if confirmed:
            out.append(PeerLeft(p.name, p.address, p.incarnation, reason))
        self.story.add(now, "removed", f"{p.name} inc {p.incarnation}: {reason}")
        self._forget_address(p.address, out)

    def _forget_address(self, address: str, out: list[Action]) -> None:
        """Hang up on `address` unless a seed or a member is there."""
        if address not in self._seed_probes and address not in self._peers.by_address:
            out.append(Disconnect(address))

    def _beat(self, now: float, out: list[Action]) -> None:
        beats = self._speaker.beats(self._info, self._term, self._peers.by_name.values(), now)
        out.extend(Send(address, beat) for address, beat in beats)

    def _hello(self, reply: bool, now: float) -> PeerHello:
        return self._speaker.hello(self._info, self._term, reply, self._peers.by_name.values(), now)

    def _probe_seeds(self, now: float, out: list[Action]) -> None:
        hello: PeerHello | None = None

        def probe(address: str) -> None:
            nonlocal hello
            hello = hello or self._hello(True, now)  # built once, and only if needed
            out.append(Connect(address))
            out.append(Send(address, hello))

        self._seed_probes.run(now, self._linked, probe)

    def _linked(self, address: str) -> bool:
        """A live member answers at `address`."""
        name = self._peers.by_address.get(address)
        return name is not None and self._peers.by_name[name].status in LIVE

    def _view(self, p: Peer) -> MemberView:
        return MemberView(p.name, p.address, p.view_state(), p.cpus, p.gpus, p.slots_free,
                          p.load, p.version, p.incarnation, p.last_heard, p.term,
                          p.tasks_done)  # fmt: skip


def _by_name(p: Peer) -> str:
    return p.name

