"""When a node stands for the lease: the election's back-off order — sans-IO.

Not needed for safety, only to settle fast: voters stand in address order
(rank × lease/8 plus jitter), other nodes only after three leases; each
failed attempt doubles the jitter (up to 4 slots). Two candidates at once
settle by the same order: the later one yields (`priority`).
"""

from __future__ import annotations

import random


class StandingOrder:
    """The back-off order of one election's voters, seen from `address`."""

    def __init__(self, voters: list[str], address: str, lease: float, rng: random.Random) -> None:
        self.ranks = {voter: i for i, voter in enumerate(voters)}
        self.rank = self.ranks.get(address)  # None: not a voter
        self._slot = lease / 8
        self._lease = lease
        self._rng = rng

    def priority(self, address: str) -> tuple[int, int, str]:
        """Back-off order: voters by address, then everyone else by address."""
        rank = self.ranks.get(address)
        return (0, rank, "") if rank is not None else (1, 0, address)

    def delay(self, attempt: int, without: str | None = None) -> float:
        """How long to wait before standing after `attempt` failed tries: our
        place in the order (that of the voters but `without`, one that stands
        no more) plus jitter."""
        slot = self._slot
        jitter = self._rng.uniform(0, slot * 2 ** min(attempt, 2))
        if self.rank is None:
            return 3 * self._lease + jitter
        rank = self.rank
        if without is not None and self.ranks.get(without, rank) < rank:
            rank -= 1
        return rank * slot + jitter
