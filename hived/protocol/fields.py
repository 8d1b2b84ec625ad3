"""What a value from a peer may be: the field types mesh messages are declared with.

The wire layer (`hived.protocol.wire`) checks each header value against its field's
annotation when it decodes a message, `Rule`s included, so a value outside
these ranges is a `RemoteProtocolError` naming the field and what was
expected, before any core or socket call sees it.

The bounds are far above anything an honest node sends, and low enough that
nothing derived from them overflows: a term or an incarnation fits in a
double (JSON, logs) with room to count up, and an address is one ZeroMQ can
dial.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from hived.net.addresses import is_wildcard, split_tcp
from hived.protocol.wire import Rule

# Terms and incarnations stay below 2**53: exact as a double, and a node that
# counts up one at a time never reaches the end.
MAX_TERM = 1 << 53
MAX_INCARNATION = 1 << 53
MAX_COUNT = 1 << 62  # slots, items, indices: no honest value comes near
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def is_peer_address(value: Any) -> bool:
    """Whether `value` is an address a peer can be dialled at: tcp://host:port,
    host an IP or a name (not a wildcard), port 1..65535."""
    if type(value) is not str or len(value) > 300:
        return False
    parsed = split_tcp(value)
    return parsed is not None and not is_wildcard(parsed[0])


Term = Annotated[int, Rule("a term from 0 to 2**53 - 1", lambda v: 0 <= v < MAX_TERM)]
Incarnation = Annotated[
    int, Rule("an incarnation from 0 to 2**53 - 1", lambda v: 0 <= v < MAX_INCARNATION)
]
Count = Annotated[int, Rule("a count from 0 to 2**62 - 1", lambda v: 0 <= v < MAX_COUNT)]
RoundId = Annotated[int, Rule("a round id from 0 to 2**64 - 1", lambda v: 0 <= v < 1 << 64)]
Seconds = Annotated[
    float, Rule("a finite number of seconds, 0 or more", lambda v: math.isfinite(v) and v >= 0)
]
Load = Annotated[float, Rule("a finite load, 0 or more", lambda v: math.isfinite(v) and v >= 0)]
Name = Annotated[
    str, Rule('a node name of letters, digits, ".", "_" and "-" (at most 253)',
              lambda v: NODE_NAME.fullmatch(v) is not None),
]  # fmt: skip
Address = Annotated[str, Rule("a tcp://host:port address a peer can be dialled at", is_peer_address)]

# Where a worker was when it died, besides an item's index: the worker keeps
# one of these in its black box, and RANGE LOST carries one across the mesh.
BETWEEN = -1  # not running any range (never on the wire)
SOMEWHERE = -2  # in a range, at an item not recorded (the fast path, or unpickling)
NOT_STARTED = -3  # on the wire for None: no item at fault (a range refused, or lost without a crash)
CrashedAt = Annotated[int, Rule("an item index, -2 or -3", lambda v: NOT_STARTED <= v < MAX_COUNT)]


def at_most(n: int, what: str) -> Rule:
    """A rule for a list field: at most `n` items."""
    return Rule(f"a list of at most {n} {what}", lambda v: len(v) <= n)
