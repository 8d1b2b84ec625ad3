"""Where a client may reach its hive, and what its jobs hear when it moves.

Theory of operation
-------------------
A client talks to one node, its jobs' owner. It keeps an `AddressBook`:
the addresses it was given (`connect("tcp://a:7700,tcp://b:7700")`, or
HIVED_ADDRESS), and those the node it talks to names (WELCOME, then NODES
whenever the hive's nodes change). When that node is lost (it answers no
PING for its `dead_after`, says it holds nothing of ours, or refuses a job
because it stops or drains), the client greets every candidate at once,
the lost address last in the list, and adopts the first node that welcomes
it and is not draining; rounds repeat until one does, or until no node has
answered a PING for `reconnect_timeout` seconds. Then each map hears
`Moved` and sends again, on the new link, its job and every chunk not yet
answered (it holds their inputs until they are: the bounded window keeps
that small); each submitted call goes again. Results land in per-chunk
slots that are filled once, so what two owners both answer is delivered
once: execution is at-least-once, delivery exactly-once.

    connect(addresses) ──▶ AddressBook ◀── WELCOME / NODES (learned)
                                │ candidates(lost)
    link lost ──▶ mover thread ─┴─▶ HELLO to each ──▶ first WELCOME adopted
                                       │
                 maps: Moved ──▶ resend job + unanswered chunks; calls: sent again

This module holds no sockets: the client (`hived.caller.client`) does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hived.errors import HiveError

EMBEDDED = "embedded"
RECONNECT_TIMEOUT = 30.0
TRIED_AT_ONCE = 16  # candidates greeted in one round: a bound on threads and sockets


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """The addresses in `address`: a list of them, or one string with commas;
    HiveError naming what was wrong and what was expected."""
    if isinstance(address, str):
        parts = [part.strip() for part in address.split(",")]
    elif isinstance(address, (list, tuple)) and all(isinstance(a, str) for a in address):
        parts = [a.strip() for a in address]
    else:
        raise HiveError(
            f"address {address!r}: expected a string or a list of strings "
            "('embedded', 'ipc://PATH' or 'tcp://HOST:PORT')"
        )
    if not parts or not all(parts):
        raise HiveError(f"address {address!r}: an empty address; expected addresses separated by commas")
    for part in parts:
        if part == EMBEDDED:
            if len(parts) > 1:
                raise HiveError(f"address {address!r}: 'embedded' cannot be one of several addresses")
        elif not part.startswith(("ipc://", "tcp://")):
            raise HiveError(
                f"address {part!r}: expected 'embedded', 'ipc://PATH' or 'tcp://HOST:PORT'"
            )
    return list(dict.fromkeys(parts))


def check_reconnect_timeout(value: object) -> float:
    """`value` as seconds, or ValueError saying what was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"reconnect_timeout must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


class AddressBook:
    """The addresses a client was given, then those its nodes named."""

    def __init__(self, given: list[str], dialable: Callable[[str], bool]) -> None:
        self.given = given
        self.learned: list[str] = []
        self._dialable = dialable  # whether we can dial a learned address (a key for tcp)

    def learn(self, nodes: Sequence[str]) -> None:
        """The hive's nodes as the node we talk to lists them now."""
        self.learned = [a for a in dict.fromkeys(nodes) if a not in self.given]

    def candidates(self, lost: str | None = None) -> list[str]:
        """Whom to greet, best first: what we were given, then what we learned
        (those we can dial), the address just lost last (it may come back)."""
        found = [*self.given, *(a for a in self.learned if self._dialable(a))]
        if lost in found:
            found.remove(lost)
            found = [*found[: TRIED_AT_ONCE - 1], lost]
        return found[:TRIED_AT_ONCE]


@dataclass(frozen=True)
class Reconnecting:
    """To a map's caller thread: its node was lost and the client looks for another."""

    reason: str


@dataclass(frozen=True)
class Moved:
    """To a map's caller thread: the client talks to another link now (`epoch`);
    the map sends its job and its unanswered chunks again."""

    epoch: int
    address: str
