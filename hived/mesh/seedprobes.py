"""When membership dials each seed again — sans-IO.

A seed is probed (dialled, and sent a HELLO asking for one back) whenever
no live member answers at its address, with exponential back-off from one
heartbeat up to `cap`, jittered by ±20% so nodes started together do not
probe in step. So a node that started before its seeds, or a partition
that healed after both sides forgot each other, reconnects on its own. A
seed a live member answers at is checked again a heartbeat later, its
back-off reset.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable


class SeedProbes:
    """The probe times of one node's seeds (never its own address)."""

    def __init__(
        self, seeds: list[str], heartbeat: float, cap: float, now: float, rng: random.Random
    ) -> None:
        self.heartbeat, self.cap, self._rng = heartbeat, cap, rng
        # address -> [next probe, current interval]
        self._probes = {s: [now, heartbeat] for s in seeds}
        self.due = now if self._probes else math.inf  # the earliest next probe

    def __contains__(self, address: str) -> bool:
        return address in self._probes

    def run(self, now: float, linked: Callable[[str], bool], probe: Callable[[str], None]) -> None:
        """Call `probe(address)` for each seed due at `now` that is not
        `linked` (a live member answers there), in the seeds' order."""
        due = math.inf
        for address, times in self._probes.items():
            if linked(address):
                times[0], times[1] = now + self.heartbeat, self.heartbeat
                continue  # linked: checked again on the next tick
            if now >= times[0]:
                probe(address)
                times[0] = now + times[1] * self._rng.uniform(0.8, 1.2)
                times[1] = min(times[1] * 2, self.cap)
            due = min(due, times[0])
        self.due = due if due < math.inf else now + self.heartbeat
