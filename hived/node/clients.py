"""A node's clients: those that said HELLO, and the strangers that did not.

A client of the node's previous process, one it dropped as silent, or one
that never said HELLO pings every heartbeat until it hears. Such a stranger
is logged once and told once (STRANGER): it fails its calls instead of
waiting for ever, and the log does not grow by a ping. A query waits for its
answer, so each is answered with the error (hivectl shows it).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from hived.protocol.control import Answer, Stranger
from hived.protocol.wire import Message

# Unknown clients remembered as told (a bound: any number may write to the socket).
STRANGERS_KEPT = 4096


@dataclass
class ClientState:
    id: bytes
    label: str
    last_seen: float
    jobs: set[int] = field(default_factory=set)
    fns: set[bytes] = field(default_factory=set)
    unwelcome: str | None = None  # why its version may not run jobs here (queries it may ask)


class Strangers:
    """Unknown clients seen, and whether each was told so, oldest first."""

    def __init__(self, node_name: str, log: logging.Logger, kept: int = STRANGERS_KEPT) -> None:
        self.node_name, self.kept = node_name, kept
        self.log = log  # the node's: a stranger is the node's news
        self._told: collections.OrderedDict[bytes, bool] = collections.OrderedDict()

    def known(self, cid: bytes) -> None:
        """`cid` said HELLO: a client now, a stranger no more."""
        self._told.pop(cid, None)

    def answer(self, cid: bytes, msg: Message) -> Message | None:
        """What to send stranger `cid` for `msg` (None: it was told already)."""
        told = self._told.get(cid)
        if told is None:
            told = self._told[cid] = False
            if len(self._told) > self.kept:
                self._told.popitem(last=False)
            self.log.info(
                "control: %s from an unknown client %s (of this node's previous process, or one "
                "dropped as silent); told once that its calls here are lost, and not logged again",
                type(msg).__name__, cid.hex(),
            )
        request = getattr(msg, "request", None)
        if request is not None:
            text = f"hived on {self.node_name} answers only clients that said HELLO first"
            return Answer(request, {"error": text})
        if told:
            return None
        self._told[cid] = True
        return Stranger(self.node_name)
