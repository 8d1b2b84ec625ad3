"""How far a term from a peer is believed — the election's vouching, sans-IO.

Terms from peers move by bounded, checked steps (a member with a bug or a
bit flip must not wedge the election for good):
* **Vouching.** Every other voter reports its own term (in its heartbeats,
  and as `seen` in a DENY); `vouched` is the highest term a majority of the
  other voters reported. `term_limit()` is TERM_STEP above the larger of
  `vouched` and what we had written down when we started. A LEADER above it
  is refused (`RemoteProtocolError`), an ASK above it is denied, and a
  higher term in a heartbeat, a DENY or a POINT is not adopted: nothing
  near the end of the range is ever persisted, so the next ask always fits.
* **Safe.** Only fencing and liveness depend on this, never the promise
  rule: refusing a term can stop a voter granting, and can make us ignore
  a coordinator's message, but never make two holders of a term.
* **Live.** Honest terms rise one per election, and voters report theirs
  every heartbeat, so an honest term is never TERM_STEP ahead of what a
  majority vouches for. A node far behind (a wiped disk, a long partition)
  catches up as soon as a majority of the other voters report the hive's
  term. One member alone, even at a voter's address, cannot lift
  `vouched` above what an honest voter reports, so however many messages
  it sends, terms rise at most TERM_STEP per round of heartbeats between
  honest voters, and the 2**53 range cannot run out.

"""

from __future__ import annotations

from hived.protocol.fields import MAX_TERM

# How far above the term a majority of voters vouch for a peer's term may be
# (honest terms rise one per election, and voters report theirs every
# heartbeat, so an honest node is never more than a few ahead).
TERM_STEP = 16


class Vouching:
    """The terms the other voters reported, and the limit they set.

    `recalled` is what this node had written down when it started."""

    def __init__(self, address: str, voters: list[str], recalled: int) -> None:
        self._others = frozenset(voters) - {address}
        self._reports: dict[str, int] = {}
        self._vouched = 0  # the highest term a majority of the other voters reported
        self._recalled = recalled

    def report(self, address: str, term: int) -> None:
        """The node at `address` knows of `term`. What a majority of the other
        voters know bounds the terms we take from anyone (`limit`): one voter
        alone cannot lift it above what an honest one reports, and a voter
        whose disk was wiped still catches up with the rest."""
        if address in self._others and term > self._reports.get(address, 0):
            self._reports[address] = term
            known = sorted((self._reports.get(v, 0) for v in self._others), reverse=True)
            self._vouched = max(self._vouched, known[len(self._others) // 2])

    def limit(self) -> int:
        """The highest term a peer may bring us: TERM_STEP above what a majority
        of the other voters vouch for (or what we had written down when we
        started)."""
        return min(max(self._vouched, self._recalled) + TERM_STEP, MAX_TERM - 2)
