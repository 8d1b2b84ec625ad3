"""A candidate's rounds of asking the voters for a term — sans-IO.

One round is one ASK for a term, sent to every voter at once; it is won
when a majority granted, lost when so many denied that no majority is left
(or when it times out, a quarter lease after it was sent). `Rounds` keeps
the rounds in flight by id, counts their GRANTs and DENYs, and says when
one is decided. What a decided round means (the lease, a renewal, a lost
candidacy) is the election's (`hived.mesh.election`), which drives this.

* A round given up (a failed candidacy) sends RELEASE to the voters that
  granted it: the grant protects nothing any more, and would otherwise
  block them for a lease.
* A DENY from a free voter that promised our candidacy's term to another
  node makes the candidate ask again at once, one term higher (once per
  candidacy), instead of waiting the round out.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hived.errors import InternalError
from hived.mesh.election_messages import Action, Ask, Deny, Grant, Release
from hived.mesh.sansio import Send, Story, StrEnum


@dataclass(slots=True)
class Round:
    term: int
    sent: float
    expires: float
    renewal: bool
    grants: set[str]
    denies: set[str]
    wait: float = 0.0  # how long the denying voters said they keep refusing
    outbid: bool = False  # a re-ask at a higher term: at most one per candidacy

    def answer(self, voter: str, granted: bool, wait: float) -> None:
        (self.grants if granted else self.denies).add(voter)
        self.wait = max(self.wait, wait)


class Verdict(StrEnum):
    WON = "won"  # a majority granted
    LOST = "lost"  # too many denied for a majority to be left


class Rounds:
    """The rounds `name` (at `address`) has in flight, by round id."""

    def __init__(
        self, name: str, address: str, voters: list[str], lease: float, rng: random.Random,
        story: Story,
    ) -> None:  # fmt: skip
        self._name = name
        self._address = address
        self._voters = voters
        self._majority = len(voters) // 2 + 1
        self._lease = lease
        self._story = story
        self._open: dict[int, Round] = {}
        self.candidacy: int | None = None  # round id of our candidacy
        # a random start: a late answer to an earlier process's round is
        # unlikely to match one of ours
        self.next_id = rng.getrandbits(48)

    def __bool__(self) -> bool:
        return bool(self._open)

    def own(self) -> Round | None:
        """Our candidacy's round, while it is in flight."""
        return self._open.get(self.candidacy) if self.candidacy is not None else None

    def renewing(self) -> bool:
        return any(r.renewal for r in self._open.values())

    def next_expiry(self) -> float:
        return min((r.expires for r in self._open.values()), default=math.inf)

    def expire(self, now: float) -> list[tuple[int, Round]]:
        """Close the rounds that timed out by `now`, and return them."""
        expired = [(rid, r) for rid, r in self._open.items() if now >= r.expires]
        for rid, _ in expired:
            del self._open[rid]
        return expired

    def open(
        self, term: int, now: float, renewal: bool, out: list[Action], outbid: bool = False
    ) -> tuple[int, Round]:
        """Start a round for `term` and ASK every other voter (our own vote,
        if we are one, the election gives itself)."""
        rid = self.next_id
        self.next_id += 1
        r = Round(term, now, now + self._lease / 4, renewal, set(), set(), outbid=outbid)
        self._open[rid] = r
        if not renewal:
            self.candidacy = rid
        self._story.add(now, "renewing" if renewal else "standing", f"term {term} round {rid}")
        ask = Ask(term, rid, self._name)
        out.extend(Send(voter, ask) for voter in self._voters if voter != self._address)
        return rid, r

    def granted(self, sender: str, m: Grant, now: float) -> Round | None:
        """Count a GRANT; the round it counts for, or None if it is stray."""
        r = self._open.get(m.round)
        if r is None or r.term != m.term or sender not in self._voters:
            self._story.add(now, "stray grant", f"term {m.term} round {m.round} from {sender}")
            return None
        r.grants.add(sender)
        return r

    def denied(self, sender: str, m: Deny) -> Round | None:
        """Count a DENY from a voter; the round it counts for, or None."""
        r = self._open.get(m.round)
        if r is None or r.term != m.term:
            return None
        if sender in r.grants:
            return None  # a duplicate ask answered after a restart: the grant still counts
        r.denies.add(sender)
        r.wait = max(r.wait, min(m.wait, self._lease))
        return r

    def outbid(self, r: Round, m: Deny) -> bool:
        """DENY `m`, counted for round `r`, says its voter is free but promised
        our candidacy's term to someone else: ask again at once, above it,
        instead of waiting the round out (once per candidacy)."""
        return self.own() is r and not r.outbid and m.wait == 0 and m.seen >= r.term

    def decide(self, rid: int, r: Round) -> Verdict | None:
        """Won or lost by its answers so far (a decided round is closed), or None."""
        if len(r.grants) >= self._majority:
            verdict = Verdict.WON
        elif len(r.denies) > len(self._voters) - self._majority:
            verdict = Verdict.LOST
        else:
            return None
        del self._open[rid]
        return verdict

    def won(self, r: Round) -> None:
        """Round `r` (closed) was won: the candidacy, if it was one, is over,
        and rounds sent before it close (they could only end earlier)."""
        self.candidacy = None
        for rid in [rid for rid, o in self._open.items() if o.sent <= r.sent]:
            del self._open[rid]

    def clear(self) -> None:
        self._open.clear()

    def release(self, rid: int, r: Round, out: list[Action]) -> None:
        """Give round `rid` up: close it and free the grants it got from
        other voters (they protect nothing now)."""
        self._open.pop(rid, None)
        release = Release(r.term, rid)
        out.extend(Send(v, release) for v in sorted(r.grants) if v != self._address)

    def give_up_candidacy(self, out: list[Action], r: Round | None = None) -> Round:
        """Our candidacy ends: release its round `r`, looked up unless it is
        given (it was closed already), and return it."""
        rid = self.candidacy
        if rid is None:
            raise InternalError(f"election of {self._name} is a candidate without a round")
        if r is None:
            r = self._open[rid]
        self.candidacy = None
        self.release(rid, r, out)
        return r
