"""Hostile messages for the fuzz tests, generated from the message definitions.

One generator for every surface: mesh messages from a key holder (the
simulator's hostile tests and the real daemons' fuzz test), control messages
from a local client, answers from a fake daemon. `messages(types, live,
words)` draws any registered message type, so a type added tomorrow is
fuzzed with no change here. Each field's values come from its annotation, the
way `hived.protocol.wire` checks it: mostly values its rules let through (so messages
reach the code behind the checks and are not all dropped as strangers), and
values at and past every bound (msgpack's integer ends, NaN, infinities,
wildcard and junk addresses, over-long lists, odd strings).

`live` maps a field's name, or its annotation (`hived.protocol.fields.Name`), to the
values the peer under test really uses (the job numbers a client opened, the
sender's own name and address); `words` are strings worth drawing for any
text field (the hive's names and addresses).

`Count` tallies what a fuzz test tried, per surface; the tests print it.
"""

from __future__ import annotations

import types
import typing
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union

from hypothesis import strategies as st

from hived.mesh.shell import MESH_PREFIXES
from hived.protocol import control  # noqa: F401 - register their types
from hived.protocol.fields import Address, Name
from hived.protocol.serialization import function_digest
from hived.protocol.wire import _REGISTRY, Message, Rule

# Where msgpack's integers end, and the usual suspects inside.
EDGE_INTS = [-(2**63), -3, -1, 2**31 - 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**53 + 1,
             2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip
EDGE_FLOATS = [-0.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf")]
ODD_STRINGS = ["", " ", "\n", "9.9.9", "x" * 4096, "tcp://*:7700", "tcp://10.0.0.1:0",
               "not an address", "ipc:///x"]  # fmt: skip
STATES = ["alive", "draining", "0.1.0"]

ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)

# Honest-looking values per base type, kept where a field's rules allow them.
_CANDIDATES: dict[Any, list[Any]] = {
    int: list(range(41)), float: [0.0, 0.25, 1.0, 2.5], bytes: [b"", b"f" * 32],
}  # fmt: skip


def _weighted(*pairs: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    return st.one_of(*[s for weight, s in pairs for _ in range(weight)])


def values_for(hint: Any, words: Sequence[str] = ()) -> st.SearchStrategy[Any]:
    """Values for a field annotated `hint`: mostly what its rules let through,
    the rest at and past every bound."""
    words = list(words) + STATES
    origin = typing.get_origin(hint)
    if hint is Any:
        return ANY
    if origin is Annotated:  # a checked field (hived.protocol.fields): valid values three times in four
        base = values_for(hint.__origin__, words)
        rules = [r.ok for r in hint.__metadata__ if isinstance(r, Rule)]
        candidates = words if hint.__origin__ is str else _CANDIDATES.get(hint.__origin__, [])
        valid = [v for v in candidates if all(ok(v) for ok in rules)]
        return _weighted((3, st.sampled_from(valid)), (1, base)) if valid else base
    if hint is bool:
        return st.booleans()
    if hint is int:
        return _weighted((12, st.integers(0, 40)), (1, st.sampled_from(EDGE_INTS)),
                         (1, st.integers(-(2**63), 2**64 - 1)))  # fmt: skip
    if hint is float:
        return _weighted((6, st.floats(0, 5)), (1, st.sampled_from(EDGE_FLOATS)),
                         (1, st.floats()), (1, st.integers(-(2**63), 2**63)))  # fmt: skip
    if hint is str:
        return _weighted((8, st.sampled_from(words)), (1, st.sampled_from(ODD_STRINGS)),
                         (1, st.text(max_size=24)))  # fmt: skip
    if hint is bytes:
        return st.binary(max_size=80)
    if hint is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of([values_for(arg, words) for arg in typing.get_args(hint)])
    if origin in (list, tuple):
        args = typing.get_args(hint)
        item = values_for(args[0] if args else Any, words)
        # past MAX_GOSSIP and the other list bounds, cheaply: one value, repeated
        return _weighted((8, st.just([])), (3, st.lists(item, max_size=4)),
                         (1, item.map(lambda v: [v] * 65)))  # fmt: skip
    if origin is dict:
        key, value = typing.get_args(hint) or (Any, Any)
        return st.dictionaries(values_for(key, words), values_for(value, words), max_size=4)
    raise TypeError(f"no hostile values for {hint!r}")


def registered(*prefixes: bytes) -> list[type[Message]]:
    """Every message type on the wire whose type name starts with one of
    `prefixes` (all of them without one)."""
    return sorted((cls for name, cls in _REGISTRY.items() if name.startswith(prefixes or (b"",))),
                  key=lambda c: c.TYPE)  # fmt: skip


MESH_TYPES = registered(*MESH_PREFIXES)


@st.composite
def message(
    draw: Any, cls: type[Message], live: Mapping[Any, list[Any]], words: Sequence[str]
) -> tuple[Message, list[bytes]]:
    """One message of type `cls` and its payload frames; a field named in
    `live`, or annotated with a key of it, takes one of those values three
    times in four."""
    values = {}
    for name, hint, _ in cls._checks:
        drawn = values_for(hint, words)
        known = live.get(name) or live.get(hint)
        if known:
            drawn = _weighted((3, st.sampled_from(known)), (1, drawn))
        values[name] = draw(drawn)
    payload = draw(st.lists(st.binary(max_size=200), max_size=3))
    if "fn" in values and payload and draw(st.booleans()):
        values["fn"] = function_digest(payload[0])  # a blob that matches its hash: on to the worker
    return cls(**values), payload


def messages(
    types_: list[type[Message]],
    live: Mapping[Any, list[Any]] | None = None,
    words: Sequence[str] = (),
) -> st.SearchStrategy[tuple[Message, list[bytes]]]:
    """Any message of `types_` with its payload frames."""
    return st.sampled_from(types_).flatmap(lambda cls: message(cls, live or {}, words))


def mesh_messages(
    names: list[str], addresses: list[str]
) -> st.SearchStrategy[tuple[Message, list[bytes]]]:
    """Any mesh message, its fields drawn from the hive's own names and
    addresses and from values past every bound; the last name and address are
    the sender's own, and a sender mostly names itself, as it must for its
    claims to be taken."""
    own = {Name: [names[-1]], Address: [addresses[-1]]}
    return messages(MESH_TYPES, own, names + addresses)


class Count:
    """What a fuzz test tried: batches and messages, by type."""

    def __init__(self, surface: str) -> None:
        self.surface, self.batches, self.types = surface, 0, Counter()

    def add(self, msgs: list[Message]) -> None:
        self.batches += 1
        self.types.update(type(m).TYPE.decode() for m in msgs)

    def report(self) -> str:
        top = ", ".join(f"{t} {n}" for t, n in sorted(self.types.items()))
        return (
            f"fuzz {self.surface}: {self.batches} batches, {sum(self.types.values())} "
            f"messages of {len(self.types)} types ({top})"
        )
