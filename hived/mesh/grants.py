"""A voter's grant book: what it promised, to whom, until when — sans-IO.

The voter's part of the lease election (`hived.mesh.election`), kept apart
from the candidate's and the coordinator's: a node whose address is a
voter grants term t to a candidate only if

* it is past its start-up quarantine of one lease (it may have granted
  something before a restart and forgotten it);
* no unexpired grant of its own stands for another node; and
* t is above every term it promised, or t is the term it promised to that
  same candidate (a renewal).

It times each grant on its own clock: `until = received + lease`. The
election persists `promised` before the GRANT leaves, so it survives
restarts. A grant is freed early only when it protects nothing: its
candidacy failed (RELEASE, for that round and term) or its holder stopped
(RESIGN, for that term).
"""

from __future__ import annotations

import math

from hived.mesh.sansio import Story


class GrantBook:
    """The promises of one voter. `address` is the voter's own: the vote it
    gives itself as a candidate is in this book too."""

    def __init__(
        self, address: str, lease: float, promised: int, quiet_until: float, story: Story
    ) -> None:
        self.address = address
        self.lease = lease
        self.promised = promised  # the highest term granted (never goes down)
        self.holder: str | None = None  # the address it was granted to
        self.round = -1  # the round it was granted in
        self.until = -math.inf  # when the grant ends, on our clock
        self.quiet_until = quiet_until
        self._story = story

    def vote(
        self,
        candidate: str,
        term: int,
        rid: int,
        now: float,
        *,
        unsaved_until: float | None,
        resigned: tuple[str, int] | None,
        own_round_ends: float | None,
    ) -> tuple[bool, float]:
        """Grant or refuse `term` to `candidate` in round `rid`; a refusal says
        how long we would keep refusing. `unsaved_until`: a Persist failed and
        nothing is promised until then; `resigned`: the latest RESIGN heard;
        `own_round_ends`: when our own candidacy's round times out, if any."""
        if unsaved_until is not None:
            return False, max(unsaved_until - now, 0.0)
        if now < self.quiet_until:
            return False, self.quiet_until - now
        if resigned is not None and resigned[0] == candidate and term <= resigned[1]:
            return False, 0.0  # a renewal of a resigned lease, still in flight
        if self.holder not in (None, candidate) and self.until > now:
            wait = self.until - now
            if self.holder == self.address and own_round_ends is not None:
                # our own candidacy: it is decided (and our vote freed) by its timeout
                wait = min(wait, own_round_ends - now)
            return False, wait
        if term > self.promised or (term == self.promised and self.holder == candidate):
            if term > self.promised or self.holder != candidate:
                self._story.add(now, "granted", f"term {term} to {candidate}")
            self.promised = term
            self.holder = candidate
            self.round = rid
            self.until = now + self.lease
            return True, 0.0
        return False, 0.0

    def promised_elsewhere(self, now: float) -> bool:
        """An unexpired grant of ours stands for another node."""
        return self.holder not in (None, self.address) and self.until > now

    def release(self, sender: str, term: int, rid: int, now: float) -> bool:
        """`sender`'s candidacy round `rid` for `term` failed: free its grant.
        True if a grant of ours was freed."""
        if self.holder == sender and self.round == rid and self.promised == term:
            self.until = min(self.until, now)
            self._story.add(now, "released", f"term {term} by {sender}")
            return True
        return False

    def resign(self, sender: str, term: int, now: float) -> None:
        """`sender` stopped acting as coordinator of `term`: free its grant."""
        if self.holder == sender and self.promised == term and self.until > now:
            self.until = now
            self._story.add(now, "resigned", f"term {term} by {sender}: grant freed")

    def free_own(self, now: float) -> None:
        """We gave up our candidacy or lease: the vote we gave ourselves
        protects nothing now, so other candidates may have it at once."""
        if self.holder == self.address:
            self.until = min(self.until, now)
