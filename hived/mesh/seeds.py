"""What this node knows of each of its seeds: a member, or why it is not.

A seed that cannot be reached, or that refuses us (another cluster key,
another protocol major), leaves this node isolated, or costs the election a
voter, while the node itself looks healthy. So the mesh shell feeds this
table what its sockets see, and `hivectl status`, `hivectl doctor` and the
STATUS= line show every seed that is not a live member, with the reason:

    our DEALER's monitor ──▶ CONNECT_RETRIED, no connection ──▶ unreachable
                        ──▶ HANDSHAKE_FAILED_* ───────────────▶ refusing (key)
                        ──▶ HANDSHAKE_SUCCEEDED ──────────────▶ (reason cleared)
    our ROUTER inbox ──▶ a message of another protocol major ─▶ refusing (version)
    our DEALER ──▶ its REFUSED: it read ours as another major ─▶ refusing (version)
    membership ──▶ a live member ─────────────────────────────▶ member

A reason stays until something newer replaces it or the seed is a member.
A peer that is not a seed and speaks another major (a node upgraded past
us that has us as its seed, or that we have as ours under another name) is
kept too, in `other_rows`, for `REFUSAL_KEPT` seconds after its last
message: it never becomes a member, and a machine switched off stops
showing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import zmq

log = logging.getLogger(__name__)

MEMBER, JOINING, UNREACHABLE, REFUSING = "member", "joining", "unreachable", "refusing"
# The DEALER monitor events the table reads.
EVENTS = (
    zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
WRONG_KEY = "it failed the CURVE handshake: it holds another cluster key, or none"
NO_CONNECTION = "no connection (refused, or no answer): is hived running there, and its port open?"
# Seconds a refusing peer that is not a seed is shown after its last message;
# it says HELLO at its seed back-off, at most `dead_after` apart.
REFUSAL_KEPT = 300.0
MAX_OTHERS = 64  # refusing peers (not seeds) kept: the most recent


class SeedWatch:
    def __init__(self, seeds: Collection[str], me: str) -> None:
        self.seeds = [s for s in dict.fromkeys(seeds) if s != me]
        self._problems: dict[str, tuple[str, str]] = {}
        self._connected: set[str] = set()  # a connection since the last retry
        self._others: dict[str, tuple[str, float]] = {}  # refusing, not a seed: why, last seen

    def dealer_event(self, address: str, event: int) -> None:
        """An event of the monitor on our DEALER to `address`."""
        if address not in self.seeds:
            return
        if event == zmq.EVENT_CONNECTED:
            self._connected.add(address)
        elif event == zmq.EVENT_CONNECT_RETRIED:
            if address not in self._connected:
                self._note(address, UNREACHABLE, NO_CONNECTION)
            self._connected.discard(address)
        elif event & _FAILED:  # a handshake failed: there was a connection
            self._connected.add(address)
            self._note(address, REFUSING, WRONG_KEY)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            # Reached, with the right key; a version refusal comes after this.
            if self._problems.get(address, ("", WRONG_KEY))[1] in (WRONG_KEY, NO_CONNECTION):
                self._problems.pop(address, None)

    def refused(self, address: str, why: str, now: float) -> None:
        """`address` speaks another protocol major: we refused its message, or
        it refused ours (`now`: the caller's monotonic clock)."""
        if address in self.seeds:
            self._note(address, REFUSING, why)
            return
        old = self._others.pop(address, None)
        if old is None or old[0] != why:
            log.warning("mesh: peer %s is %s: %s", address[:64], REFUSING, why)
        self._others[address] = (why, now)
        if len(self._others) > MAX_OTHERS:
            del self._others[next(iter(self._others))]

    def _note(self, address: str, state: str, why: str) -> None:
        if self._problems.get(address) != (state, why):  # logged once a change, not a retry
            log.warning("mesh: seed %s is %s: %s", address, state, why)
        self._problems[address] = (state, why)

    def rows(self, alive: Collection[str]) -> list[dict[str, Any]]:
        """One row per seed: address, state, and why where it is not a member."""
        rows = []
        for address in self.seeds:
            if address in alive:
                self._problems.pop(address, None)
                rows.append({"address": address, "state": MEMBER, "why": ""})
            else:
                state, why = self._problems.get(address, (JOINING, "not heard from yet"))
                rows.append({"address": address, "state": state, "why": why})
        return rows

    def other_rows(self, alive: Collection[str], now: float) -> list[dict[str, Any]]:
        """One row per refusing peer that is not a seed, heard within `REFUSAL_KEPT`."""
        for address, (_, seen) in list(self._others.items()):
            if address in alive or now - seen > REFUSAL_KEPT:
                del self._others[address]
        return [{"address": a, "state": REFUSING, "why": why} for a, (why, _) in self._others.items()]
