"""The lease election — a sans-IO core (DESIGN.md, "Lease election").

Theory of operation
-------------------
The voters are the seed addresses (a node with no seeds is its own, single
voter). Every node runs the same core, which plays two parts:

* **Voter** (if its address is a voter). It grants a term by the promise
  rule of its grant book (`hived.mesh.grants`), timing each grant on its own
  clock: `grant_until = received + lease`. The promise is persisted
  (`Persist`, emitted before the GRANT) so it survives restarts.
* **Candidate / coordinator.** With no coordinator it believes in, and once
  its randomised back-off runs out, a node asks every voter for term
  t = highest seen + 1 (or again for the term it last asked, while nobody has
  been seen at or above it: that keeps a lonely minority from inflating
  terms), in a round of asking (`hived.mesh.rounds`). Once a round is won it
  is coordinator until `sent + hold`, where `sent` is when *it sent* the
  asks and `hold = lease - (lease * max_drift + min_margin)`. From a third of
  the way through it renews with new rounds for the same term (the next term
  if a round is refused, e.g. by restarted voters that no longer know it
  holds the term); if no round succeeds it steps down at the end of its lease.
* **Announcements.** The coordinator broadcasts LEADER (term, name, address,
  remaining lease) after each successful round; every node, voter or not,
  believes it for `remaining` minus the drift margin on its own clock, which
  is what `coordinator(now)` answers. A minority side stops hearing it and
  answers None once that runs out.
* **Hand-over.** A node that is stopping (`step_down`) never stands again;
  if it holds the lease it stops acting first (LostCoordinator), then sends
  RESIGN(t) to every voter and live member. A voter whose unexpired grant
  stands for that sender and that term frees it, so it may grant t + 1 at
  once; a node that believed the sender's lease for t drops the belief and
  backs off to stand (the voters after the sender in the order move up one
  place, so the next stands within a slot); both refuse that sender's ASK
  and LEADER up to t from then on (a renewal or an announcement still in
  flight). Safety needs nothing of it: a grant is freed only after its
  holder stopped, and only for its own term (a later process of the same
  node asks above every term its predecessor asked, the promise being on
  disk before any ASK left), so a delayed, duplicated or reordered RESIGN
  frees nothing anyone acts on, and a lost one (or one an older node does
  not know) costs the old wait.
* **Fencing.** `term` is the highest term known to have had a coordinator
  (announced, won, or reported by heartbeats). `accept_term(t)` is False for
  anything below it (and above `term_limit()`); coordinator messages of
  other cores must pass it. A LEADER must come from the address it names.

Terms from peers move by bounded, checked steps (`hived.mesh.vouching`): a
peer's term above `term_limit()` is refused, denied or not adopted.

Settling fast (none of this is needed for safety, only for liveness):
* Back-off (`hived.mesh.standing`): voters stand in address order, other
  nodes after three leases. A voter whose vote is promised to another
  candidate does not stand until that grant runs out.
* A DENY says how long the voter will keep refusing, so a candidate waits out
  a dead coordinator's grants instead of hammering the voters.
* A candidate asked by a candidate earlier in the back-off order yields (drops
  its round and votes), so a duel ends in one round.
* Rounds RELEASE what they got when given up, and re-ask above a term
  promised elsewhere (`hived.mesh.rounds`).

Clocks: `max_drift` bounds how far two nodes' clock rates differ, as a ratio
(slower / faster >= 1 - max_drift). The candidate's lease ends at real time
`sent + hold / rate_c`; the voter's grant at `received + lease / rate_v`,
with `received >= sent`. `hold < lease * (1 - max_drift) <= lease * rate_c /
rate_v`, so the holder always stops first.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hived.config import DEFAULT_LEASE
from hived.errors import InternalError, RemoteProtocolError
from hived.mesh.election_messages import (
    MESSAGES,
    Action,
    Ask,
    BecameCoordinator,
    Broadcast,
    Deny,
    Grant,
    Leader,
    LostCoordinator,
    Persist,
    Release,
    Resign,
)
from hived.mesh.grants import GrantBook
from hived.mesh.roles import CANDIDATE, COORDINATOR, FOLLOWER, TRANSITIONS, Role, RoleEvent
from hived.mesh.rounds import Round, Rounds, Verdict
from hived.mesh.sansio import Send, Story, transition
from hived.mesh.standing import StandingOrder
from hived.mesh.vouching import TERM_STEP, Vouching
from hived.protocol.wire import Message

# What the shell, the mesh core and the simulator take from here.
__all__ = [
    "CANDIDATE", "COORDINATOR", "FOLLOWER", "MESSAGES", "TERM_STEP", "Action", "Ask",
    "BecameCoordinator", "Broadcast", "Deny", "Election", "Grant", "Leader", "LostCoordinator",
    "Persist", "Release", "Resign", "Role", "RoleEvent",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Belief:
    name: str
    address: str
    term: int
    until: float


class Election:
    """One node's part in the lease election. See the module docstring."""

    def __init__(
        self,
        name: str,
        address: str,
        voters: list[str],
        now: float,
        rng: random.Random,
        *,
        lease: float = DEFAULT_LEASE,
        max_drift: float = 0.01,
        min_margin: float = 0.01,
        initial_term: int = 0,
        initial_promised: int = 0,
        story_size: int = 256,
    ) -> None:
        hold = lease - (lease * max_drift + min_margin)
        if not (lease > 0 and 0 <= max_drift < 1 and min_margin >= 0 and hold > 0):
            raise InternalError(
                f"lease {lease} leaves no time to hold it after the drift margin "
                f"(max_drift {max_drift}, min_margin {min_margin})"
            )
        self.name = name
        self.address = address
        self._alone = not voters
        self._voters = sorted(set(voters)) or [address]
        self._order = StandingOrder(self._voters, address, lease, rng)
        self.lease = lease
        self.hold = hold
        self._drift = max_drift
        self._min_margin = min_margin
        self.story = Story(f"election of {name}", story_size)
        # what we know
        self._term = initial_term  # fencing floor: highest term known held
        self._high = max(initial_term, initial_promised)  # highest term seen at all
        self._asked = initial_promised  # highest term we asked for
        self._persisted: tuple[int, int] | None = (initial_term, initial_promised)
        self._vouching = Vouching(address, self._voters, max(initial_term, initial_promised))
        self._belief: _Belief | None = None  # someone else's lease we believe in
        # voter part
        # a node with no seeds elects itself at once; any other voter may have
        # granted something before a restart, so it waits one lease
        quiet_until = now if self._alone else now + lease
        self._book = GrantBook(address, lease, initial_promised, quiet_until, self.story)
        # candidate / coordinator part
        self._role = FOLLOWER
        self._lease_term = 0
        self._lease_end = -math.inf
        self._renew_at = math.inf
        self._bump = False  # the next renewal round asks for a new term
        self._rounds = Rounds(name, address, self._voters, lease, rng, self.story)
        self._attempt = 0
        self._stand_at = now if self._alone else now + self._backoff()
        self._outbox: list[Action] = []
        # a Persist failed: no promise is made (no grant, no candidacy) until a
        # write succeeds; the write is tried again at this time
        self._unsaved_until: float | None = None
        self._now = now  # the latest time we were given (for accept_term's step-down)
        # hand-over: we are stopping (never stand again), and the term we
        # resigned; the latest RESIGN heard: (sender, term)
        self._stopping = False
        self._handed_over: int | None = None
        self._resigned: tuple[str, int] | None = None
        self.story.add(now, "start", f"voters={self._voters} term={initial_term}")

    # -- what the shell reads ----------------------------------------------

    @property
    def term(self) -> int:
        """The highest term known to have had a coordinator (the fencing floor)."""
        return self._term

    @property
    def state(self) -> Role:
        return self._role

    @property
    def stopping(self) -> bool:
        """`step_down` was called: this node stands no more."""
        return self._stopping

    @property
    def voters(self) -> list[str]:
        return list(self._voters)

    def is_coordinator(self, now: float) -> bool:
        return (
            self._role == COORDINATOR and now < self._lease_end and self._lease_term >= self._term
        )

    def coordinator(self, now: float) -> tuple[str, int] | None:
        """(name, term) of the coordinator whose lease we believe valid, else None."""
        if self.is_coordinator(now):
            return self.name, self._lease_term
        b = self._belief
        if b is not None and b.term >= self._term and now < b.until:
            return b.name, b.term
        return None

    def coordinator_address(self, now: float) -> str | None:
        if self.is_coordinator(now):
            return self.address
        b = self._belief
        if b is not None and b.term >= self._term and now < b.until:
            return b.address
        return None

    def announcement(self, now: float) -> Leader | None:
        """Our LEADER message while we hold the lease (for a peer that just
        joined or came back), else None."""
        if not self.is_coordinator(now):
            return None
        return Leader(self._lease_term, self.name, self.address, self._lease_end - now)

    def persist_failed(self, now: float) -> list[Action]:
        """The shell could not write the last Persist and dropped what came
        after it. Until a write succeeds we promise nothing: a voter grants
        nothing, a candidate gives up, a coordinator steps down (its renewals
        would raise promises it cannot keep across a restart)."""
        out, self._outbox = self._outbox, []
        self._now = now
        if self._unsaved_until is None:
            self.story.add(now, "persist failed", f"term {self._term}: promising nothing")
        self._unsaved_until = now + self.lease / 4
        if self._role == COORDINATOR:
            self._step_down(now, "the promise could not be written", out)
        elif self._role == CANDIDATE:
            self._lost_candidacy(now, out)
        return out

    def step_down(self, now: float) -> list[Action]:
        """The node is stopping: it never stands again, and if it holds the
        lease it gives it up now, first stopping (LostCoordinator), then
        telling every voter and live member (RESIGN), so the hive elects
        another within a round instead of a lease after we are gone. A node
        that is its own only voter keeps the lease: nobody else could hold it."""
        out, self._outbox = self._outbox, []
        self._now = now
        if not self._stopping:
            self._stopping = True
            self.story.add(now, "stopping", f"in state {self._role}, term {self._term}")
        if self._role == CANDIDATE:
            self._lost_candidacy(now, out)
        elif self._role == COORDINATOR and self._voters != [self.address]:
            term = self._lease_term
            self._step_down(now, "stopping: handing over", out)
            self._handed_over = term
            others = tuple(v for v in self._voters if v != self.address)
            out.append(Broadcast(Resign(term), also=others))
        return self._finish(out)

    def accept_term(self, term: int) -> bool:
        """Fencing: False for a coordinator message below the highest term seen,
        or above `term_limit()`. A higher term raises the floor (a coordinator
        below it steps down)."""
        if term < self._term:
            return False
        if term > self._term:
            if term > self.term_limit():
                self.story.add(self._now, "incredible", f"term {term} > {self.term_limit()}")
                return False
            self._raise_floor(term, self._outbox)
        return True

    def heard_term(self, address: str, term: int) -> bool:
        """The node at `address` reported `term` for itself (in a heartbeat):
        from a voter, what it vouches for; then as `accept_term`."""
        self._vouching.report(address, term)
        return self.accept_term(term)

    def term_limit(self) -> int:
        """The highest term a peer may bring us: TERM_STEP above what a majority
        of the other voters vouch for (or what we had written down when we
        started)."""
        return self._vouching.limit()

    def next_deadline(self) -> float | None:
        """Local time at which `tick` has work; -inf means at once."""
        if self._outbox:
            return -math.inf
        if self._unsaved_until is not None:
            due = self._unsaved_until  # the next try at writing; no standing till then
        elif self._persisted != (self._term, max(self._book.promised, self._asked)):
            return -math.inf
        else:
            standing = self._role == FOLLOWER and self._belief is None and not self._stopping
            due = self._stand_at if standing else math.inf
        if self._role == COORDINATOR:
            due = min(due, self._lease_end)
            if not self._rounds.renewing():
                due = min(due, self._renew_at)
        elif self._belief is not None:
            due = min(due, self._belief.until)
        due = min(due, self._rounds.next_expiry())
        return due if due < math.inf else None

    # -- what the shell feeds ----------------------------------------------

    def handle(self, sender: str, msg: Message, now: float) -> list[Action]:
        """Feed one decoded election message from the node at `sender`."""
        if not isinstance(msg, MESSAGES):
            raise InternalError(
                f"election got a {type(msg).__name__}, not one of its messages"
            )
        out, self._outbox = self._outbox, []
        self._now = now
        match msg:
            case Ask():
                self._on_ask(sender, msg, now, out)
            case Grant():
                self._on_grant(sender, msg, now, out)
            case Deny():
                self._on_deny(sender, msg, now, out)
            case Release():
                self._on_release(sender, msg, now, out)
            case Resign():
                self._on_resign(sender, msg, now, out)
            case Leader():
                self._on_leader(sender, msg, now, out)
        return self._finish(out)

    def tick(self, now: float) -> list[Action]:
        """Time out rounds, renew or give up the lease, and stand when due."""
        out, self._outbox = self._outbox, []
        self._now = now
        if self._unsaved_until is not None and now >= self._unsaved_until:
            self._persisted = None  # try the write again (see _finish)
        for rid, r in self._rounds.expire(now):
            self._round_failed(rid, r, now, out)
        if self._role == COORDINATOR:
            if now >= self._lease_end:
                self._step_down(now, "lease ran out unrenewed", out)
            elif now >= self._renew_at and not self._rounds.renewing():
                term = self._next_term() if self._bump else self._lease_term
                self._ask(term, now, True, out)
        if self._belief is not None and now >= self._belief.until:
            self.story.add(now, "belief expired", f"{self._belief.name} term {self._belief.term}")
            self._belief = None
            self._stand_at = now + self._backoff()
        if (self._role == FOLLOWER and self._belief is None and now >= self._stand_at
                and self._unsaved_until is None and not self._stopping):  # fmt: skip
            if self._book.promised_elsewhere(now):
                # our vote is promised to another candidate: standing now would
                # only split the votes, so wait until that grant runs out
                self._stand_at = self._book.until + self._backoff()
                return self._finish(out)
            self._move(RoleEvent.STAND, now)
            self._ask(self._next_term(), now, False, out)
        return self._finish(out)

    # -- invariants --------------------------------------------------------

    def validate(self) -> None:
        """Check the invariants above; raise InternalError with the story."""
        problems = []
        if self._role == COORDINATOR and self._lease_term < 1:
            problems.append("coordinator without a term")
        if self._role == CANDIDATE and self._rounds.own() is None:
            problems.append("candidate without a round")
        if self._role == FOLLOWER and self._rounds:
            problems.append("follower with rounds in flight")
        if self._book.promised > max(self._high, self._asked):
            problems.append(f"promised {self._book.promised} above anything seen")
        if self._lease_term > self._term:
            problems.append(f"lease term {self._lease_term} above the floor {self._term}")
        if self._stopping and self._role == CANDIDATE:
            problems.append("stands while stopping")
        if self._handed_over is not None and self._role == COORDINATOR:
            problems.append(f"coordinator again after resigning term {self._handed_over}")
        if problems:
            raise InternalError(
                f"election of {self.name} in state {self._role}, term {self._term}, broke "
                f"invariants: {'; '.join(problems)}\n" + self.story.format(50)
            )

    # -- voter part --------------------------------------------------------

    def _vote(self, candidate: str, term: int, rid: int, now: float) -> tuple[bool, float]:
        """Grant or refuse `term` to `candidate`; the refusal says for how long."""
        own = self._rounds.own()
        return self._book.vote(
            candidate, term, rid, now, unsaved_until=self._unsaved_until,
            resigned=self._resigned, own_round_ends=None if own is None else own.expires,
        )  # fmt: skip

    def _on_ask(self, sender: str, m: Ask, now: float, out: list[Action]) -> None:
        if self._order.rank is None:
            self.story.add(now, "not a voter", f"asked by {sender} for term {m.term}")
            out.append(Send(sender, Deny(m.term, m.round, self._term, self.lease)))
            return
        if m.term > self.term_limit():
            # a promise that high would be persisted, and every honest ask
            # after it refused: the candidate learns our terms instead
            self.story.add(now, "incredible", f"ASK term {m.term} from {sender}")
            seen = max(self._book.promised, self._term)
            out.append(Send(sender, Deny(m.term, m.round, seen, 0.0)))
            return
        order = self._order
        if self._role == CANDIDATE and order.priority(sender) < order.priority(self.address):
            # two candidates at once: the one that stands first in the back-off
            # order wins, so a duel ends in one round instead of a lease
            self.story.add(now, "yields", f"to {sender}")
            self._lost_candidacy(now, out)
        granted, wait = self._vote(sender, m.term, m.round, now)
        if granted:
            self._high = max(self._high, m.term)  # our own next candidacy must exceed it
            out.append(Send(sender, Grant(m.term, m.round)))
        else:
            seen = max(self._book.promised, self._term)
            out.append(Send(sender, Deny(m.term, m.round, seen, wait)))

    # -- candidate part ----------------------------------------------------

    def _next_term(self) -> int:
        if self._asked > self._high:
            return self._asked  # nobody has been seen at or above our last ask
        return max(self._high, self._term) + 1

    def _ask(
        self, term: int, now: float, renewal: bool, out: list[Action], outbid: bool = False
    ) -> None:
        self._asked = max(self._asked, term)
        rid, r = self._rounds.open(term, now, renewal, out, outbid)
        if self.address in self._voters:
            r.answer(self.address, *self._vote(self.address, term, rid, now))
        self._tally(rid, r, now, out)

    def _on_release(self, sender: str, m: Release, now: float, out: list[Action]) -> None:
        if self._book.release(sender, m.term, m.round, now):
            if self._role == FOLLOWER and self._belief is None:
                self._stand_at = min(self._stand_at, now + self._backoff())

    def _on_resign(self, sender: str, m: Resign, now: float, out: list[Action]) -> None:
        if m.term > self.term_limit():
            self.story.add(now, "incredible", f"RESIGN term {m.term} from {sender}")
            return
        if self._resigned is None or self._resigned[0] != sender or self._resigned[1] < m.term:
            self._resigned = (sender, m.term)
        self._book.resign(sender, m.term, now)
        b = self._belief
        if b is not None and b.address == sender and b.term == m.term:
            self.story.add(now, "resigned", f"{b.name} gave up term {m.term}")
            self._belief = None
            self._stand_at = now + self._backoff(without=sender)

    def _on_grant(self, sender: str, m: Grant, now: float, out: list[Action]) -> None:
        r = self._rounds.granted(sender, m, now)
        if r is not None:
            self._tally(m.round, r, now, out)

    def _on_deny(self, sender: str, m: Deny, now: float, out: list[Action]) -> None:
        if sender not in self._order.ranks:
            return  # only voters answer asks
        self._vouching.report(sender, m.seen)
        if m.seen <= self.term_limit():
            self._high = max(self._high, m.seen)
        r = self._rounds.denied(sender, m)
        if r is None:
            return
        self._tally(m.round, r, now, out)
        if self._rounds.outbid(r, m):
            self._rounds.release(m.round, r, out)
            self._free_own_vote(now)
            self._ask(self._next_term(), now, False, out, outbid=True)

    def _tally(self, rid: int, r: Round, now: float, out: list[Action]) -> None:
        verdict = self._rounds.decide(rid, r)
        if verdict == Verdict.WON:
            self._won(r, now, out)
        elif verdict == Verdict.LOST:
            self._round_failed(rid, r, now, out)

    def _won(self, r: Round, now: float, out: list[Action]) -> None:
        end = r.sent + self.hold
        if end <= now or r.term < self._term:
            self.story.add(now, "won too late", f"term {r.term} (floor {self._term})")
            if self._role == CANDIDATE and not r.renewal:
                self._lost_candidacy(now, out, r)
            return
        self._move(RoleEvent.WON, now)
        new_term = r.term > self._lease_term
        self._lease_term = max(self._lease_term, r.term)
        self._lease_end = max(self._lease_end, end)
        self._renew_at = r.sent + self.hold / 3
        self._bump = False
        self._rounds.won(r)
        self._attempt = 0
        self._belief = None
        if self._lease_term > self._term:
            self._raise_floor(self._lease_term, out)
        if new_term or not r.renewal:
            self.story.add(now, "coordinator", f"term {self._lease_term} until {end:.4f}")
        out.append(BecameCoordinator(self._lease_term, self._lease_end))
        leader = Leader(self._lease_term, self.name, self.address, self._lease_end - now)
        out.append(Broadcast(leader))

    def _round_failed(self, rid: int, r: Round, now: float, out: list[Action]) -> None:
        """Round `rid` (closed) was refused or timed out."""
        if r.renewal:
            if r.denies:
                self._bump = True  # refused: the next renewal asks for a new term
            self._renew_at = max(self._renew_at, r.sent + self.lease / 8)
            return
        if self._role == CANDIDATE and rid == self._rounds.candidacy:
            self._lost_candidacy(now, out, r)

    def _lost_candidacy(self, now: float, out: list[Action], r: Round | None = None) -> None:
        """Back to follower: free the votes our candidacy's round got (we will
        never act on them, and late grants for it are ignored) and back off."""
        r = self._rounds.give_up_candidacy(out, r)
        self._move(RoleEvent.LOST, now)
        self._free_own_vote(now)
        self._attempt += 1
        self._stand_at = now + r.wait + self._backoff()

    def _on_leader(self, sender: str, m: Leader, now: float, out: list[Action]) -> None:
        if m.address != sender:
            raise RemoteProtocolError(
                f"LEADER from {sender} announces {m.address}; a node announces only itself"
            )
        if m.term > self.term_limit():
            raise RemoteProtocolError(
                f"LEADER from {sender} has term {m.term}, more than {TERM_STEP} above the "
                f"{self.term_limit() - TERM_STEP} a majority of voters vouch for"
            )
        if m.term < self._term:
            self.story.add(now, "fenced", f"LEADER term {m.term} < {self._term} from {m.name}")
            return
        if m.address == self.address:
            return  # an echo of our own announcement, or of our previous process
        r = self._resigned
        if r is not None and r[0] == sender and m.term <= r[1]:
            self.story.add(now, "resigned", f"LEADER term {m.term} from {m.name} came late")
            return
        if m.term > self._term:
            self._raise_floor(m.term, out)
        elif self._role == COORDINATOR:
            self.story.add(now, "conflict", f"{m.name} claims our term {m.term}")
            return
        remaining = min(m.remaining, self.lease)
        until = now + remaining - (remaining * self._drift + self._min_margin)
        if until <= now:
            return
        b = self._belief
        if b is None or b.term != m.term or b.address != m.address:
            self.story.add(now, "believes", f"{m.name} term {m.term} for {until - now:.3f}s")
        self._belief = _Belief(m.name, m.address, m.term, until)
        if self._role == CANDIDATE:
            self._lost_candidacy(now, out)
        self._attempt = 0

    # -- shared ------------------------------------------------------------

    def _raise_floor(self, term: int, out: list[Action]) -> None:
        self._term = term
        self._high = max(self._high, term)
        if self._role == COORDINATOR and self._lease_term < term:
            self._step_down(self._now, f"term {term} seen", out)

    def _step_down(self, now: float, why: str, out: list[Action]) -> None:
        self._move(RoleEvent.STEP_DOWN, now)
        self.story.add(now, "stepped down", f"term {self._lease_term}: {why}")
        out.append(LostCoordinator(self._lease_term))
        self._free_own_vote(now)
        self._lease_end = -math.inf
        self._renew_at = math.inf
        self._rounds.clear()
        self._attempt = 0
        self._stand_at = now + self._backoff()

    def _free_own_vote(self, now: float) -> None:
        """We gave up our candidacy or lease: the vote we gave ourselves protects
        nothing now (late grants for a dropped round are ignored), so other
        candidates may have it at once instead of after a lease."""
        if self._role != COORDINATOR:
            self._book.free_own(now)

    def _move(self, event: RoleEvent, now: float) -> None:
        """Move by the table (TRANSITIONS); an event our role does not allow is a bug."""
        old = self._role
        new = transition(TRANSITIONS, f"election of {self.name}, term {self._term}", old, event)
        if new != old:
            self.story.add(now, f"{old}->{new}", f"term {self._term}")
        self._role = new

    def _backoff(self, without: str | None = None) -> float:
        return self._order.delay(self._attempt, without)

    def _finish(self, out: list[Action]) -> list[Action]:
        """Put a Persist first if what must survive a restart changed."""
        state = (self._term, max(self._book.promised, self._asked))
        if state != self._persisted:
            self._persisted = state
            # optimistic: if this write fails too, the shell says so before
            # anything else reaches us (persist_failed)
            self._unsaved_until = None
            out.insert(0, Persist(*state))
        return out
